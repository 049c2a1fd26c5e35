"""The package's import graph, read from the source (no imports run): no circle; the three stages (sft, reward,
rl) never import each other; the training library stands on at most 5 floors; nothing in it imports the
measurement wing (bench, analysis) or export."""
import ast
import functools

from tests.conftest import ROOT

PKG = ROOT / "perl_jax"
STAGES = ("sft", "reward", "rl")
OUTSIDE = ("bench", "analysis", "export")  # Above the training library: they may import it, never the reverse.


def _modules() -> dict:
  """{"rl.setup": path, "sft": path, "models": path of models/__init__.py, ...}."""
  out = {}
  for path in PKG.rglob("*.py"):
    parts = path.relative_to(PKG).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    if name:
      out[name] = path
  return out


def _imports(name: str, path, modules: dict) -> set:
  """The perl_jax modules `name` imports (at any depth of its code, lazy imports included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("perl_jax"):
      base = node.module[len("perl_jax."):] if node.module != "perl_jax" else ""
      for alias in node.names:
        full = f"{base}.{alias.name}" if base else alias.name
        found.add(full if full in modules else base)
    elif isinstance(node, ast.Import):
      found.update(a.name[len("perl_jax."):] for a in node.names if a.name.startswith("perl_jax."))
  return {m for m in found if m and m != name}


def _graph() -> dict:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def component(name: str) -> str:
  """A module's component: its top-level module or subpackage ("rl.setup" -> "rl")."""
  return name.split(".")[0]


def floors(graph: dict) -> dict:
  """Component -> floor: 1 + the highest floor it imports (edges inside a component do not count)."""
  edges = {}
  for name, deps in graph.items():
    edges.setdefault(component(name), set()).update(component(d) for d in deps if component(d) != component(name))

  @functools.cache
  def floor(c):
    return 1 + max((floor(d) for d in edges.get(c, ())), default=0)
  return {c: floor(c) for c in edges}


def test_no_import_circle():
  graph, state = _graph(), {}

  def visit(m, path):
    if state.get(m) == "done":
      return
    assert state.get(m) != "open", "import circle: " + " -> ".join(path + [m])
    state[m] = "open"
    for d in graph.get(m, ()):
      visit(d, path + [m])
    state[m] = "done"
  for m in graph:
    visit(m, [])


def test_stages_never_import_each_other_and_training_never_imports_the_wing():
  for name, deps in _graph().items():
    mine = component(name)
    for d in deps:
      theirs = component(d)
      assert not (mine in STAGES and theirs in STAGES and mine != theirs), f"{name} imports {d}"
      assert not (mine not in OUTSIDE and theirs in OUTSIDE), f"{name} (training library) imports {d}"


def test_training_library_stands_on_at_most_five_floors():
  f = floors(_graph())
  library = {c: n for c, n in f.items() if c not in OUTSIDE}
  assert max(library.values()) <= 5, sorted(library.items(), key=lambda kv: kv[1])
  assert {library[s] for s in STAGES} == {max(library.values())}  # The stages are the top floor, side by side.
