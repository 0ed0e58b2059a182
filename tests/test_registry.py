"""The method layer's rules, checked on the source tree: methods are found, not listed; the framework names no
method; no module reaches into another's private names; every registered piece is whole."""
import ast
import os
import pkgutil

import pytest

import distill.methods
from distill import configuration, contract, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "distill")
METHODS_DIR = os.path.join(PACKAGE, "methods")


def _framework_files():
  """Every module of distill/ outside distill/methods/."""
  for d, _, files in os.walk(PACKAGE):
    if os.path.commonpath([d, METHODS_DIR]) == METHODS_DIR:
      continue
    for f in files:
      if f.endswith(".py"):
        yield os.path.join(d, f)


def _code_words(path: str) -> set[str]:
  """Identifiers and string literals of a module, docstrings and comments left out."""
  tree = ast.parse(open(path).read())
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
      first = node.body[0]
      if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        docstrings.add(id(first.value))
  words = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
      words.add(node.value)
    elif isinstance(node, ast.Name):
      words.add(node.id)
    elif isinstance(node, ast.Attribute):
      words.add(node.attr)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      words.update(a.name for a in node.names)
      if isinstance(node, ast.ImportFrom) and node.module:
        words.add(node.module)
  return words


def test_every_method_module_is_registered_by_listing_the_package():
  modules = {info.name for info in pkgutil.iter_modules(distill.methods.__path__)}
  names = {m.name for m in registry.methods()}
  assert names == modules == {"autoencoder", "text_encoder", "teacher", "guided", "sfd", "dsd", "consistency"}
  orders = [m.order for m in registry.methods()]
  # The autoencoder and text encoder first: a latent teacher trains on its latents, a text one on its captions.
  assert orders == sorted(orders)
  assert [m.name for m in registry.methods()[:3]] == ["autoencoder", "text_encoder", "teacher"]


def test_the_framework_names_no_method():
  """The issue's rule: outside distill/methods/ no module mentions SFD, DSD or consistency distillation, or
  imports a method, in its code (docstrings and comments may cite the papers). A method-specific branch
  added to evaluate.py or main.py fails here."""
  offenders = []
  for path in _framework_files():
    for word in _code_words(path):
      low = word.lower()
      if any(k in low for k in ("sfd", "dsd", "consistency")) or low.startswith("distill.methods"):
        offenders.append((os.path.relpath(path, ROOT), word))
  allowed = {("distill/registry.py", "distill.methods")}  # the discovery itself
  assert sorted(set(offenders) - allowed) == []


def test_no_module_uses_another_modules_private_names():
  offenders = []
  for d, _, files in os.walk(PACKAGE):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(d, f)
      tree = ast.parse(open(path).read())
      imported = {a.asname or a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                  for a in n.names}
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
          offenders += [(f, a.name) for a in node.names if a.name.startswith("_") and a.name != "__future__"
                        and node.module != "__future__"]
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
            and node.attr.startswith("_") and not node.attr.startswith("__")):
          offenders.append((f, f"{node.value.id}.{node.attr}"))
  # jax's own private modules are not ours to fix. The weight reader subclasses the standard library's pure-Python
  # unpickler (pickle._Unpickler), the one whose opcode table can be restricted (distill/evaluation/torch_weights.py).
  allowed = {("torch_weights.py", "pickle._Unpickler")}
  assert [o for o in offenders if not o[1].startswith(("jax.", "np.", "os.")) and o not in allowed] == []


def test_registered_pieces_are_whole_and_config_sections_come_from_their_methods():
  c = configuration.base_config()
  for m in registry.methods():
    assert m.stages, m.name
    for name, fn in list(m.stages.items()) + list(m.samplers.items()):
      assert callable(fn), (m.name, name)
    for section in (m.config() if m.config else {}):
      assert section in c, (m.name, section)
    for field in m.data_batches:
      section, key = field.split(".")
      assert key in c[section], (m.name, field)
  # A stage's sampler is registered by some method (what the evaluate stage will ask for).
  assert set(registry.sampler_names()) >= {"cfg_ddim", "ddim", "stochastic", "sfd", "consistency"}


def test_a_method_registering_a_taken_name_is_refused(monkeypatch):
  clash = contract.Method(name="clash", order=99, stages={"stage_one": lambda ctx: None})
  found = registry.methods()
  registry.methods.cache_clear()
  real_import = __import__("importlib").import_module

  def fake_import(name, *args):
    module = real_import(name, *args)
    if name == "distill.methods.consistency":
      monkeypatch.setattr(module, "METHOD", clash)
    return module

  monkeypatch.setattr(registry.importlib, "import_module", fake_import)
  try:
    with pytest.raises(RuntimeError, match="stage 'stage_one' is registered by both 'guided' and 'clash'"):
      registry.methods()
  finally:
    monkeypatch.undo()
    registry.methods.cache_clear()
  assert registry.methods() == found
