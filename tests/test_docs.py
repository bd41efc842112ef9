"""The docs cannot drift from the code: every config key and every module is documented."""

from dataclasses import fields
from pathlib import Path

from lmcache_sgl.config import CacheConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_in_the_reference():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for f in fields(CacheConfig):
        assert f"| `{f.name}` | `LMCACHE_{f.name.upper()}` |" in text, f.name


def test_every_module_is_in_the_structure_doc():
    text = (ROOT / "docs" / "structure.md").read_text()
    modules = [p for d in ("lmcache_sgl", "storage", "triton_kernels") for p in (ROOT / d).rglob("*.py")
               if p.name != "__init__.py" and not p.name.startswith("_")]
    missing = [str(p.relative_to(ROOT)) for p in modules if str(p.relative_to(ROOT)) not in text]
    assert missing == []
