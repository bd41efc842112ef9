"""Under CI=true a missing test dependency fails the run; locally it skips (issue #10 item 15)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require, require_binary

TESTS = Path(__file__).resolve().parent
MISSING_MODULE = "lmcache_sgl_no_such_module_for_ci_check"
MISSING_BINARY = "lmcache-sgl-no-such-binary-for-ci-check"


def _run_pytest(tmp_path: Path, body: str, ci: bool) -> subprocess.CompletedProcess:
    """Run pytest in a child on one generated test module, with tests/conftest.py loaded as a plugin."""
    test_file = tmp_path / "test_generated.py"
    test_file.write_text(f"import pytest\nfrom conftest import require, require_binary\n\n{body}\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           f"--rootdir={tmp_path}", str(test_file)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


ONE_TEST = "def test_body_runs():\n    assert 1 + 1 == 2\n"


@pytest.mark.parametrize("body, name", [
    (f"require({MISSING_MODULE!r})\n\n{ONE_TEST}", MISSING_MODULE),
    (f"require_binary({MISSING_BINARY!r})\n\n{ONE_TEST}", MISSING_BINARY),
    (f"@pytest.mark.requires_binary({MISSING_BINARY!r})\n{ONE_TEST}", MISSING_BINARY),
], ids=["require", "require_binary", "requires_binary-mark"])
def test_missing_dependency_fails_under_ci_and_skips_otherwise(tmp_path, body, name):
    """CI=true: a non-zero exit naming the dependency. Without CI: skipped, nothing fails."""
    ci = _run_pytest(tmp_path, body, ci=True)
    out = ci.stdout + ci.stderr
    assert ci.returncode != 0, out
    assert re.search(r"\b(failed|error)", out, re.I) and "CI=true and the test dependency" in out, out
    assert name in out and "1 skipped" not in out, out

    local = _run_pytest(tmp_path, body, ci=False)
    out = local.stdout + local.stderr
    # 5 = "no tests collected": pytest's code for a run whose only module skipped itself
    assert local.returncode in (0, 5) and "1 skipped" in out, out
    assert not re.search(r"\b(failed|error|passed)", out, re.I), out


def test_present_dependency_runs_under_ci(tmp_path):
    """CI=true with the dependency there: the module's tests run and pass."""
    body = f'require("json")\nrequire_binary("sh")\n\n\n@pytest.mark.requires_binary("sh")\n{ONE_TEST}'
    result = _run_pytest(tmp_path, body, ci=True)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


def test_helpers_return_the_module_and_path(monkeypatch):
    """require returns the imported module, require_binary the absolute path, in and out of CI."""
    for ci in ("true", None):
        if ci:
            monkeypatch.setenv("CI", ci)
        else:
            monkeypatch.delenv("CI", raising=False)
        assert require("json").dumps([1]) == "[1]"
        assert os.path.isabs(require_binary("sh"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=MISSING_MODULE):
        require(MISSING_MODULE)


def test_no_test_module_skips_on_a_missing_dependency_by_itself():
    """Every dependency check in tests/ goes through require, require_binary or the requires_binary mark."""
    bare = re.compile(r"^((\w+\s*=\s*)?pytest\.importorskip\(|.*pytest\.mark\.skipif\(.*\bwhich\()", re.M)
    offenders = [f"{p.name}:{s[:m.start()].count(chr(10)) + 1}"
                 for p in sorted(TESTS.glob("test_*.py")) for s in [p.read_text()] for m in bare.finditer(s)]
    assert not offenders, f"use conftest.require / require_binary / @pytest.mark.requires_binary: {offenders}"


def _fake_repo(tmp_path: Path, uid: int) -> tuple[Path, dict]:
    """A copy of scripts/run_tests.sh with a fake setup_venv.sh and pytest, and a PATH with no redis-server."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / "scripts" / "run_tests.sh").write_text((TESTS.parent / "scripts" / "run_tests.sh").read_text())
    (repo / "scripts" / "setup_venv.sh").write_text('echo "fake setup_venv ran"\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {repo / ".venv" / "bin" / "python": 'echo "fake pytest ran"',
               bin_dir / "id": f"echo {uid}",
               bin_dir / "apt-get": f'echo "apt-get $*" >> {tmp_path}/apt.log; exit 100'}
    bash = shutil.which("bash")
    for path, body in scripts.items():
        path.write_text(f"#!{bash}\n{body}\n")
        path.chmod(0o755)
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return repo, {"PATH": str(bin_dir)}


@pytest.mark.parametrize("uid", [0, 1000], ids=["root-apt-get-fails", "no-root"])
def test_run_tests_sh_stops_without_redis_server_under_ci(tmp_path, uid):
    """CI=true and no redis-server that can be installed: exit 1 before the venv; locally a warning only."""
    repo, env = _fake_repo(tmp_path, uid)
    run = [shutil.which("bash"), str(repo / "scripts" / "run_tests.sh")]
    ci = subprocess.run(run, env={**env, "CI": "true"}, capture_output=True, text=True, timeout=60)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "CI=true needs redis-server" in ci.stderr and "fake" not in ci.stdout, ci.stdout + ci.stderr
    assert ((tmp_path / "apt.log").exists()) == (uid == 0)  # root tried to install it

    local = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert local.returncode == 0 and "WARNING" in local.stderr, local.stdout + local.stderr
    assert "fake setup_venv ran" in local.stdout and "fake pytest ran" in local.stdout, local.stdout
