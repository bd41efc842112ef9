"""Dependencies point one way: adapters -> core -> kernels/storage. Only adapters import engines."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"sglang", "vllm", "lmcache"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_an_engine():
    core = [p for d in ("lmcache_sgl", "storage", "triton_kernels") for p in (ROOT / d).rglob("*.py")
            if "adapters" not in p.parts]
    assert len(core) > 8
    leaks = {str(p.relative_to(ROOT)): _imports(p) & ENGINES for p in core if _imports(p) & ENGINES}
    assert leaks == {}


def test_storage_does_not_import_the_core():
    for p in (ROOT / "storage").rglob("*.py"):
        assert "lmcache_sgl" not in _imports(p), p


def test_core_imports_without_engines_installed():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('sglang', 'vllm'): raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import lmcache_sgl, lmcache_sgl.tiered_store, lmcache_sgl.demo, lmcache_sgl.storage.disk_tier\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_no_top_level_triton_kernels_package():
    """triton ships its own ``triton_kernels``; ours installs only as lmcache_sgl.triton_kernels."""
    import lmcache_sgl.storage  # noqa: F401
    spec_origin = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                                  "s = u.find_spec('triton_kernels'); print(s.origin if s else None)"],
                                 capture_output=True, text=True, cwd="/").stdout.strip()
    assert str(ROOT) not in spec_origin
