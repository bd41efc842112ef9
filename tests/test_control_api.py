"""The control API (``lmcache_sgl.control``) over a real ``TieredStore``: lookup, pin, unpin, clear, health, stats."""

from __future__ import annotations

import shutil

import pytest

from conftest import prompt_chunks, random_chunk, require, store_config

from lmcache_sgl import ChunkLayout, ModelFingerprint
from lmcache_sgl.control import CacheControl, LookupReport, as_json, min_lookup, split_by_tier
from lmcache_sgl.metrics import Tier
from lmcache_sgl.tiered_store import TieredStore


def flat(per_chunk) -> list[int]:
    return [t for chunk in per_chunk for t in chunk]


def fill(store: TieredStore, keys, toks, kvs) -> None:
    for k, t, kv in zip(keys, toks, kvs):
        assert store.put(k, t, kv)
        store.flush_pending()


def test_lookup_counts_leading_tokens_per_tier(layout, tmp_path):
    """Each leading chunk counts in the fastest tier holding it; the count stops at the first miss."""
    keys, toks, kvs = prompt_chunks(layout, 4)
    with TieredStore(store_config(layout, host_chunks=2, disk_dir=tmp_path, disk_chunks=100), layout) as store:
        fill(store, keys, toks, kvs)  # write-through; chunks 0, 1 leave the host tier for disk
        ctl = CacheControl(store)
        lookups_before = store.stats().lookups
        r = ctl.lookup(flat(toks) + [5, 6, 7])
        assert r == LookupReport(prompt_tokens=67, cached_tokens=64, device=0, host=32, disk=32, remote=0)
        assert store.stats().lookups == lookups_before  # a control lookup is not a serving lookup
        changed = flat(toks)
        changed[20] += 1  # chunk 1 differs: only chunk 0 is a prefix hit
        assert ctl.lookup(changed).cached_tokens == 16
        assert ctl.lookup(flat(toks), device_tokens=40) == LookupReport(64, 64, 40, 24, 0, 0)


def test_text_lookup_uses_the_tokenizer(layout):
    """Text is tokenized with the given tokenizer; without one it is refused by name."""
    keys, toks, kvs = prompt_chunks(layout, 1)

    class Tok:
        def encode(self, text: str) -> list[int]:
            return toks[0] if text == "hello" else [1, 2]

    with TieredStore(store_config(layout, host_chunks=2), layout) as store:
        store.put(keys[0], toks[0], kvs[0])
        ctl = CacheControl(store)
        assert ctl.lookup("hello", Tok()).host == 16
        with pytest.raises(ValueError, match="tokenizer"):
            ctl.lookup("hello")


@pytest.mark.parametrize("bad", [[], [-1], ["a"], [1.5], [True], [2**31], 7, b"ab", {"a": 1}])
def test_bad_tokens_are_refused(layout, bad):
    with TieredStore(store_config(layout, host_chunks=1), layout) as store:
        with pytest.raises(ValueError, match="token"):
            CacheControl(store).lookup(bad)


def test_pinned_prefix_survives_host_pressure(layout):
    """A pinned prefix stays in a full host tier while later puts evict everything else; unpinned, it goes."""
    a_keys, a_toks, a_kvs = prompt_chunks(layout, 2, seed=1)
    b_keys, b_toks, b_kvs = prompt_chunks(layout, 6, seed=2)
    with TieredStore(store_config(layout, host_chunks=3), layout) as store:
        ctl = CacheControl(store)
        fill(store, a_keys, a_toks, a_kvs)
        pin = ctl.pin(flat(a_toks) + [9])
        assert (pin.chunks, pin.tokens, pin.host_chunks, pin.disk_chunks) == (2, 32, 2, 0)
        assert ctl.pin(flat(a_toks)).chunks == 2  # pinning again adds nothing
        fill(store, b_keys, b_toks, b_kvs)
        assert ctl.lookup(flat(a_toks)).host == 32
        assert ctl.lookup(flat(b_toks)).cached_tokens == 0  # b's leading chunks were evicted
        got = store.get(a_keys, a_toks)
        assert len(got) == 2 and all(g.equal(kv) for g, kv in zip(got, a_kvs))
        assert ctl.stats().pinned_chunks == 2
        assert ctl.unpin(flat(a_toks)).chunks == 2
        assert ctl.unpin(flat(a_toks)).chunks == 0
        fill(store, b_keys[:3], b_toks[:3], b_kvs[:3])  # store.missing() puts again
        assert ctl.lookup(flat(a_toks)).cached_tokens == 0


def test_pinned_prefix_survives_disk_trim(layout, tmp_path):
    """Disk trims skip pinned files, so the pinned prefix stays on disk while unpinned files are evicted."""
    a_keys, a_toks, a_kvs = prompt_chunks(layout, 2, seed=1)
    b_keys, b_toks, b_kvs = prompt_chunks(layout, 6, seed=2)
    with TieredStore(store_config(layout, host_chunks=3, disk_dir=tmp_path, disk_chunks=4.5), layout) as store:
        ctl = CacheControl(store)
        fill(store, a_keys, a_toks, a_kvs)
        assert ctl.pin(flat(a_toks)).disk_chunks == 2
        fill(store, b_keys, b_toks, b_kvs)
        assert store.stats().disk_evictions >= 3
        assert all(store.disk.path(k).exists() for k in a_keys)
        assert not store.disk.path(b_keys[0]).exists()
        r = ctl.lookup(flat(a_toks))
        assert r.cached_tokens == 32 and r.host + r.disk == 32
        ctl.unpin(flat(a_toks))
        fill(store, b_keys[:3], b_toks[:3], b_kvs[:3])
        assert not all(store.disk.path(k).exists() for k in a_keys)


def test_clear_by_tier_keeps_pins(layout, tmp_path):
    keys, toks, kvs = prompt_chunks(layout, 4)
    with TieredStore(store_config(layout, host_chunks=2, disk_dir=tmp_path, disk_chunks=100), layout) as store:
        ctl = CacheControl(store)
        fill(store, keys, toks, kvs)
        r = ctl.clear("host")
        assert (r.tiers, r.host_removed, r.disk_removed) == (("host",), 2, 0)
        assert ctl.lookup(flat(toks)).disk == 64
        ctl.pin(flat(toks[:1]))
        r = ctl.clear()
        assert (r.disk_removed, r.pinned_kept) == (3, 1)
        assert ctl.lookup(flat(toks)).cached_tokens == 16
        ctl.unpin(flat(toks[:1]))
        assert ctl.clear("disk").disk_removed == 1
        assert ctl.lookup(flat(toks)).cached_tokens == 0


def test_clear_by_model_leaves_other_models(layout, tmp_path):
    """Two models share a directory: clearing one by name removes its files only."""
    other = ChunkLayout(ModelFingerprint("other-model@abc", "bfloat16", num_layers=2, num_kv_heads=2,
                                         head_dim=16), layout.chunk_size)
    keys, toks, kvs = prompt_chunks(layout, 2)
    o_keys, o_toks, _ = prompt_chunks(other, 2, seed=5)
    cfg = store_config(layout, host_chunks=4, disk_dir=tmp_path, disk_chunks=100)
    with TieredStore(cfg, layout) as mine, TieredStore(cfg, other) as theirs:
        fill(mine, keys, toks, kvs)
        fill(theirs, o_keys, o_toks, [random_chunk(other, seed=i + 40) for i in range(2)])
        r = CacheControl(theirs).clear(model="other-model")
        assert (r.host_removed, r.disk_removed, r.tiers) == (2, 2, ("host", "disk"))
        assert CacheControl(mine).lookup(flat(toks)).cached_tokens == 32
        assert CacheControl(theirs).lookup(flat(o_toks)).cached_tokens == 0
        assert CacheControl(mine).clear(model="no-such-model").disk_removed == 0


@pytest.mark.parametrize("kwargs, match", [({"tier": "gpu"}, "tier='gpu'"), ({"model": ""}, "model=''"),
                                           ({"tier": "remote", "model": "m"}, "Redis")])
def test_bad_clear_is_refused(layout, kwargs, match):
    with TieredStore(store_config(layout, host_chunks=1), layout) as store:
        with pytest.raises(ValueError, match=match):
            CacheControl(store).clear(**kwargs)


def test_health_reports_a_broken_disk_and_a_dead_remote(layout, tmp_path):
    require("redis")
    from conftest import free_port

    cfg = store_config(layout, host_chunks=1, disk_dir=tmp_path / "d", disk_chunks=10,
                       remote_url=f"redis://127.0.0.1:{free_port()}/0")
    with TieredStore(cfg, layout) as store:
        ctl = CacheControl(store)
        h = ctl.health()
        by_tier = {t.tier: t for t in h.tiers}
        assert by_tier["host"].ok and by_tier["disk"].ok and by_tier["disk"].enabled
        assert not by_tier["remote"].ok and by_tier["remote"].error and not h.ok
        assert h.remote_breaker == "open"
        shutil.rmtree(tmp_path / "d")
        (tmp_path / "d").write_text("not a directory")
        disk = {t.tier: t for t in ctl.health().tiers}["disk"]
        assert not disk.ok and "not a directory" in disk.error


def test_health_is_ok_without_optional_tiers(layout):
    with TieredStore(store_config(layout, host_chunks=1), layout) as store:
        h = CacheControl(store).health()
        assert h.ok and h.remote_breaker is None
        assert [(t.tier, t.enabled) for t in h.tiers] == [("host", True), ("disk", False), ("remote", False)]


def test_results_are_json_ready(layout):
    keys, toks, kvs = prompt_chunks(layout, 1)
    with TieredStore(store_config(layout, host_chunks=1), layout) as store:
        store.put(keys[0], toks[0], kvs[0])
        ctl = CacheControl(store)
        stats = as_json(ctl.stats())
        assert stats["store"]["host_entries"] == 1 and stats["pinned_chunks"] == 0
        assert as_json(ctl.health())["tiers"][0] == {"tier": "host", "enabled": True, "ok": True, "error": None}


def test_min_lookup_and_split():
    """TP ranks combine by MIN per field; tokens split by tier past the device's part of a chunk."""
    a, b = LookupReport(100, 64, 0, 64, 0, 0), LookupReport(100, 48, 0, 32, 16, 0)
    assert min_lookup([a, b]) == LookupReport(100, 48, 0, 32, 0, 0)
    assert split_by_tier((Tier.HOST, Tier.DISK), 16, device_tokens=20) == {"host": 12, "disk": 16, "remote": 0}
    with pytest.raises(ValueError):
        min_lookup([])


def test_server_client_refuses_bad_input_and_reports_unreachable():
    from conftest import free_port
    from lmcache_sgl.control import ServerControl

    with pytest.raises(ValueError, match="server URL"):
        ServerControl("127.0.0.1:30000")
    client = ServerControl(f"http://127.0.0.1:{free_port()}", timeout_s=5)
    with pytest.raises(ValueError, match="exactly one"):
        client.lookup()
    with pytest.raises(ValueError, match="tier='gpu'"):
        client.clear("gpu")
    with pytest.raises(OSError, match="cannot reach"):
        client.lookup(tokens=[1, 2, 3])
