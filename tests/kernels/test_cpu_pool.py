"""csrc/cpu_pool.cpp: Kiln's caching allocator for torch's large CPU buffers.

The pool replaces torch's CPU allocator for the whole process and stays, so each check runs
in a fresh interpreter whose counters start at zero."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("kiln.kernels._cpu_pool")

MIB = 1 << 20


def _run(body: str) -> str:
    code = "import torch\nfrom kiln.kernels import _cpu_pool as pool\nMIB = 1 << 20\n" + textwrap.dedent(body)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_a_freed_block_is_reused_split_and_merged_back():
    _run("""
        pool.install(MIB, 60.0)
        a = torch.empty(8 * MIB, dtype=torch.uint8)
        s = pool.stats()
        assert (s["misses"], s["hits"], s["live_bytes"], s["mapped_bytes"]) == (1, 0, 8 * MIB, 8 * MIB), s
        del a
        assert pool.stats()["cached_bytes"] == 8 * MIB
        b = torch.full((MIB,), 1.0)             # 4 MiB: the cached 8 MiB block, split
        c = torch.full((MIB,), 2.0)             # the other half
        s = pool.stats()
        assert (s["misses"], s["hits"], s["splits"], s["mapped_bytes"]) == (1, 2, 1, 8 * MIB), s
        assert b.data_ptr() + 4 * MIB == c.data_ptr()
        assert b.aminmax() == (1, 1) and c.aminmax() == (2, 2)  # (no temporaries as large as the pool's)
        del b, c                                 # the halves merge: 8 MiB whole again
        s = pool.stats()
        assert (s["merges"], s["cached_bytes"], s["live_bytes"]) == (1, 8 * MIB, 0), s
        d = torch.empty(8 * MIB, dtype=torch.uint8)
        assert pool.stats()["misses"] == 1
    """)


def test_small_buffers_stay_with_the_allocator_it_replaced():
    _run("""
        before = torch.ones(4 * MIB, dtype=torch.uint8)   # allocated before the pool: freed by its own
        pool.install(MIB, 60.0)
        small = [torch.ones(1000) for _ in range(100)]
        assert pool.stats()["misses"] == 0 and pool.stats()["live_bytes"] == 0
        del before, small
        assert pool.stats()["cached_bytes"] == 0
    """)


def test_random_lifetimes_keep_every_buffer_intact_and_the_pool_bounded():
    # seeded: sizes from 1 to 40 MiB, each filled with its own value and checked before it is
    # freed (an overlap between two live blocks would show), the pool's mapping bounded
    _run("""
        import random
        pool.install(MIB, 60.0)
        rng = random.Random(0)
        live = {}
        for step in range(3000):
            if live and (rng.random() < 0.45 or len(live) > 40):
                key = rng.choice(list(live))
                t, v = live.pop(key)
                assert t.aminmax() == (v, v), (step, key)
            else:
                n = rng.randint(MIB // 4, 10 * MIB)      # float32 elements: 1 MiB to 40 MiB
                v = float(step)
                live[step] = (torch.full((n,), v), v)
            s = pool.stats()
            assert s["live_bytes"] + s["cached_bytes"] == s["mapped_bytes"], s
            assert s["mapped_bytes"] <= s["high_water_bytes"] + s["high_water_bytes"] // 4, s
        for t, v in live.values():
            assert t.aminmax() == (v, v)
        live.clear()
        del t  # the loop's last
        s = pool.stats()
        assert s["live_bytes"] == 0 and s["hits"] > s["misses"] and s["splits"] > 0 and s["merges"] > 0, s
        freed = pool.empty_cache()
        assert freed == s["cached_bytes"] and pool.stats()["mapped_bytes"] == 0
        assert pool.stats()["high_water_bytes"] == 0
    """)


def test_a_block_left_unused_is_given_back():
    _run("""
        import time
        pool.install(MIB, 0.2)
        a = torch.empty(8 * MIB, dtype=torch.uint8)
        del a
        assert pool.stats()["cached_bytes"] == 8 * MIB
        b = torch.empty(4 * MIB, dtype=torch.uint8)  # fits the cached block: reused while fresh
        del b
        time.sleep(0.5)
        c = torch.empty(16 * MIB, dtype=torch.uint8)  # does not fit: mapped, and the stale 8 MiB unmapped
        s = pool.stats()
        assert (s["hits"], s["misses"], s["unmapped"], s["cached_bytes"], s["mapped_bytes"]) == \
            (1, 2, 1, 0, 16 * MIB), s
    """)


def test_the_profiler_sees_the_pools_buffers():
    _run("""
        pool.install(MIB, 60.0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            a = torch.ones(4 * MIB, dtype=torch.uint8)
            del a
        usage = [e.cpu_memory_usage for e in prof.events()]  # the allocation counts in its op, the free apart
        assert 4 * MIB in usage and -4 * MIB in usage, usage
    """)


def test_onednn_raw_buffers_and_a_fork():
    # oneDNN's buffers come through torch's raw allocation (data pointer = context): prepacked
    # weights and a convolution's output; a forked child allocates and frees from its copy
    _run("""
        import os
        pool.install(MIB, 60.0)
        x = torch.randn(1, 64, 56, 56).contiguous(memory_format=torch.channels_last)
        w = torch.randn(256, 64, 3, 3)
        ref = torch.nn.functional.conv2d(x, w, padding=1)
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
        y = torch.ops.mkldnn._convolution_pointwise(x, packed, None, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
        assert torch.allclose(y, ref, rtol=1e-4, atol=1e-3)
        assert pool.stats()["hits"] + pool.stats()["misses"] > 0
        del packed, y
        pid = os.fork()
        if pid == 0:
            t = torch.full((2 * MIB,), 3.0)
            os._exit(0 if bool((t == 3).all()) else 1)
        assert os.waitpid(pid, 0)[1] == 0
    """)


def test_kilns_default_installs_the_pool_for_its_plans():
    out = _run("""
        import kiln
        from kiln.kernels import allocator
        model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU())
        x = torch.randn(512, 1024)
        fast = kiln.compile(model, (x,))
        with torch.no_grad():
            assert torch.allclose(fast(x), model(x), rtol=1e-4, atol=1e-4)
        print(allocator.tune_allocator(), kiln.memory_stats()["mapped_bytes"] > 0)
    """)
    assert out.split()[-2:] == ["pool", "True"]


def test_system_leaves_torchs_allocator_alone():
    out = _run("""
        import os
        os.environ["KILN_MALLOC"] = "system"
        from kiln.kernels import allocator
        print(allocator.tune_allocator(), pool.installed(), allocator.memory_stats(), allocator.empty_cache())
    """)
    assert out.split() == ["system", "False", "{}", "0"]
