"""Analysis beside training: the bag-of-words reward baseline (`bow_baseline`) and the linear probe of frozen
features (`feature_probe`), the yardsticks RMs are judged against. Nothing in training imports it."""
