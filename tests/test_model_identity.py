"""Model identity: fine-tunes with one directory name and shape never share keys; copies do."""

import json
import shutil

import pytest

from lmcache_sgl.keys import ModelFingerprint, prefix_keys
from lmcache_sgl.model_identity import ModelIdentityError, model_identity, weights_digest

from conftest import require

require("transformers")
from lmcache_sgl.models import build_tiny_llama  # noqa: E402

TOKENS = list(range(100, 164))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """run-a/checkpoint-1000 and run-b/checkpoint-1000: same shape, different weights."""
    root = tmp_path_factory.mktemp("runs")
    a = build_tiny_llama(root / "run-a" / "checkpoint-1000", seed=1)
    b = build_tiny_llama(root / "run-b" / "checkpoint-1000", seed=2)
    return a, b


def _keys(name: str) -> list[str]:
    fp = ModelFingerprint(name, "float32", num_layers=2, num_kv_heads=2, head_dim=16)
    return prefix_keys(fp, TOKENS, 16)


def test_same_name_and_shape_different_weights_share_no_keys(two_runs):
    a, b = two_runs
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    id_a, id_b = model_identity(a), model_identity(b)
    assert id_a.startswith("checkpoint-1000@") and id_b.startswith("checkpoint-1000@")
    assert id_a != id_b
    assert not set(_keys(id_a)) & set(_keys(id_b))


def test_a_copy_at_another_path_keeps_its_identity(two_runs, tmp_path):
    a, _ = two_runs
    copy = shutil.copytree(a, tmp_path / "elsewhere" / "checkpoint-1000")
    assert model_identity(copy) == model_identity(a)
    assert _keys(model_identity(copy)) == _keys(model_identity(a))


def test_a_changed_tensor_byte_changes_the_identity(two_runs, tmp_path):
    """A change at the end of the data (the last sample) is seen."""
    a, _ = two_runs
    copy = shutil.copytree(a, tmp_path / "checkpoint-1000")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_digest(copy) != weights_digest(a)


def test_config_path_field_is_ignored_but_shape_is_not(two_runs, tmp_path):
    a, _ = two_runs
    copy = shutil.copytree(a, tmp_path / "checkpoint-1000")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["_name_or_path"] = "/somewhere/else"
    (copy / "config.json").write_text(json.dumps(cfg, indent=4))
    assert weights_digest(copy) == weights_digest(a)
    cfg["rope_theta"] = 1234.0
    (copy / "config.json").write_text(json.dumps(cfg))
    assert weights_digest(copy) != weights_digest(a)


def test_explicit_model_id_wins_and_hub_ids_pass_through(two_runs):
    a, _ = two_runs
    assert model_identity(a, model_id="acme/llama-ft-7") == "acme/llama-ft-7"
    assert model_identity("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"


def test_directory_without_weights_is_named_by_its_config_with_a_warning(tmp_path, caplog):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with caplog.at_level("WARNING"):
        first = model_identity(tmp_path)
    assert "model_id" in caplog.text
    (tmp_path / "config.json").write_text('{"hidden_size": 16}')
    assert model_identity(tmp_path) != first


def test_unreadable_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelIdentityError, match="config.json"):
        model_identity(tmp_path)


def test_large_checkpoint_is_identified_without_reading_it(tmp_path):
    """A 2 GiB sparse shard: the digest reads a few samples, not the data."""
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    shard = tmp_path / "model-00001-of-00001.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[536870912],"data_offsets":[0,2147483648]}}'
    with shard.open("wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 2 * 1024**3)
    before = _bytes_read()
    digest = weights_digest(tmp_path)
    assert _bytes_read() - before < 1024**2
    assert len(digest) == 16


def _bytes_read() -> int:
    """Bytes this process has read through read() calls (Linux /proc)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_prune_by_model_accepts_the_directory_name(two_runs, tmp_path):
    """`lmcache-sgl prune --model checkpoint-1000` still finds entries named checkpoint-1000@<digest>."""
    from lmcache_sgl.cache_admin import _names_model
    name = model_identity(two_runs[0])
    assert _names_model(name, "checkpoint-1000") and _names_model(name, name)
    assert not _names_model(name, "checkpoint-100") and not _names_model(None, "checkpoint-1000")
