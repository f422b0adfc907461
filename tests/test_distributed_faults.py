"""A rank that dies (SIGKILL) or stops responding (SIGSTOP) mid-training: the survivor
must raise a clear error within the process-group timeout (5 s here) instead of hanging."""
import pytest

import _ddp_workers as workers

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_survivor_stops_with_clear_error(tmp_path, how):
    ranks = workers.spawn(how, str(tmp_path), timeout_s=60)
    (code0, out0), (code1, _) = ranks
    assert code0 == 0, f"rank 0 did not finish cleanly ({code0}):\n{out0[-3000:]}"
    assert code1 != 0, "rank 1 was meant to die"
    result = workers.read_results(str(tmp_path), world=1)[0]
    assert "all-reduce of gradient bucket" in result["error"], result["error"]
    assert "peer rank has probably exited or stopped responding" in result["error"]
    # killed: gloo notices the closed socket at once; stopped: the 5 s timeout fires
    assert result["seconds_to_error"] < 30
