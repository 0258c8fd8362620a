import pytest

from kiln.errors import KilnError
from kiln.target import Target, host_cpu


def test_host_cpu_target_has_features_and_arch():
    t = Target.parse("cpu")
    assert t is host_cpu() and t.kind == "cpu" and t.arch and t.cores >= 1
    assert t.key().startswith("cpu:" + t.arch)
    assert all(f in t.key() for f in t.features)


def test_cuda_target_built_ahead_names_its_sm():
    assert Target.parse("cuda:sm_80").sm == 80
    t = Target.parse("cuda:sm_90")
    assert (t.kind, t.arch, t.sm, str(t)) == ("cuda", "sm_90", 90, "cuda:sm_90")
    assert Target.parse("cuda:sm_80").key() != t.key()


@pytest.mark.parametrize("bad", ["tpu", "cuda:ampere", 3])
def test_bad_target_is_a_clear_error(bad):
    with pytest.raises(KilnError, match="target|architecture"):
        Target.parse(bad)
