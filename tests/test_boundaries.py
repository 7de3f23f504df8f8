"""Package boundaries, read from the import statements of every module under moe_lm/ (ast, so comments, strings and
docstrings that name a package do not count).

- DeepSpeed is imported under moe_lm/moe/ only: the MoE layer, the engine and the checkpoint files are the door.
- The checkpoint format is below training and export: moe_lm/checkpoint/ and moe_lm/export/ import nothing of
  moe_lm/train/, so that evaluating or exporting a checkpoint never pulls in the training loop.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_lm"


def imported_names(path: Path) -> set[str]:
    """The dotted names `path` imports, at the top or inside a function: `import a.b` gives a.b, `from a import b`
    gives a and a.b (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def importers(package: str, outside: str = "") -> list[str]:
    """moe_lm files, outside the folder `outside` (relative to moe_lm/), that import `package` or a submodule."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if outside and relative.is_relative_to(outside):
            continue
        if any(name == package or name.startswith(package + ".") for name in imported_names(path)):
            found.append(str(relative))
    return found


def test_imported_names_sees_imports_inside_functions_and_ignores_strings(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""import deepspeed"""\n\ndef f():\n    from moe_lm import train\n'
                      '    import torch.distributed as dist\n    from . import sibling\n')
    assert imported_names(source) == {"moe_lm", "moe_lm.train", "torch.distributed"}


def test_only_moe_imports_deepspeed():
    assert importers("deepspeed", outside="moe") == []
    assert importers("deepspeed")  # the scan does find the adapter's own imports


def test_checkpoint_and_export_do_not_import_training():
    assert [path for path in importers("moe_lm.train") if path.startswith(("checkpoint/", "export/"))] == []
