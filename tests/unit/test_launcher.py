"""The child set-up the launcher runs before exec'ing vLLM, on the event loop the guard uses."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import uvloop

from tests.conftest import BASE_CONFIG, KEYS
from vllm_guard.config import parse_config
from vllm_guard.engine.launcher import child_setup, guard_scheduler_cls, vllm_command

AUTOGROUP = Path("/proc/self/autogroup")

_REPORT = """
import os
print(os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid(), os.nice(0))
print(open("/proc/self/autogroup").read() if os.path.exists("/proc/self/autogroup") else "")
"""


async def _spawn_and_report(nice: int) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        "python3", "-c", _REPORT, preexec_fn=child_setup(nice), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return out.decode().splitlines()


def test_child_gets_its_own_session_and_the_nice_value_not_the_guard():
    """uvloop runs preexec_fn before its own setsid: writing the autogroup there once
    deprioritised the guard itself. The child must lead its own session and process group
    (so killpg takes vLLM's engine core along) and carry the nice value alone."""
    guard_nice = os.nice(0)
    guard_autogroup = AUTOGROUP.read_text() if AUTOGROUP.exists() else ""
    lines = uvloop.run(_spawn_and_report(7))
    assert lines[0] == f"True True {min(19, guard_nice + 7)}"
    if guard_autogroup:
        assert lines[1].endswith("nice 7")
        assert lines[1].split()[0] != guard_autogroup.split()[0]
        assert AUTOGROUP.read_text() == guard_autogroup
    assert os.nice(0) == guard_nice


def test_nice_zero_leaves_priority_alone():
    lines = uvloop.run(_spawn_and_report(0))
    assert lines[0] == f"True True {os.nice(0)}"


@pytest.mark.parametrize(
    "args",
    [
        ["--max_num_seqs", "256"],  # vLLM turns _ into - before parsing
        ["--max-num-seqs=256"],
        ["--max_num_seqs=256"],
        ["--max-num-se", "7"],  # argparse takes an unambiguous prefix
        ["--scheduling_policy", "fcfs"],
        ["--schedulin", "fcfs"],
        ["--scheduler_cls", "x.Y"],
        ["--config", "vllm.yaml"],  # could set any of them
        ["--config=vllm.yaml"],
        ["--uds", "/tmp/sock"],  # vLLM would not listen where the guard connects
        ["--enforce-eager", "--host=0.0.0.0"],
    ],
)
def test_every_spelling_of_an_owned_argument_is_refused(args):
    with pytest.raises(ValueError, match="is set by vllm-guard"):
        vllm_command("m", 1, 4, args)


def test_other_vllm_arguments_pass_unchanged():
    extra = ["--enforce-eager", "--max-model-len", "512", "--config-format", "hf", "--dtype=half"]
    assert vllm_command("m", 1, 4, extra)[-len(extra) :] == extra


def test_owned_vllm_arguments_are_refused_after_the_separator():
    with pytest.raises(ValueError, match="--max-num-seqs is set by vllm-guard"):
        vllm_command("m", 1, 4, ["--max-num-seqs=8"])
    cmd = vllm_command("m", 1234, 4, ["--enforce-eager"])
    assert cmd[cmd.index("--scheduling-policy") + 1] == "priority"
    assert cmd[cmd.index("--max-num-seqs") + 1] == "4"
    assert cmd[-1] == "--enforce-eager"


def test_the_scheduler_plugin_is_passed_only_by_the_config():
    plugin = "vllm_guard.engine.scheduler.GuardScheduler"
    cmd = vllm_command("m", 1234, 4, ["--enforce-eager"], scheduler_cls=plugin)
    assert cmd[cmd.index("--scheduler-cls") + 1] == plugin
    assert "--scheduler-cls" not in vllm_command("m", 1234, 4, [])
    with pytest.raises(ValueError, match=r"engine\.scheduler"):
        vllm_command("m", 1, 4, ["--scheduler-cls", "x.Y"])
    # The CPU build turns vLLM's async scheduling off: the plain Scheduler's subclass.
    assert guard_scheduler_cls().endswith(".GuardScheduler")


def test_the_plugin_policy_comes_from_the_config():
    config = parse_config(
        BASE_CONFIG.replace(
            "engine: {", "engine: {scheduler: guard, max_preemptions_per_request: 5, "
        ),
        "t.yaml",
        KEYS,
    )
    assert config.engine.scheduler == "guard"
    assert config.engine.max_preemptions_per_request == 5
    assert config.engine.max_preemptions_per_step == 4


def test_serve_falls_back_to_reserved_slots_where_the_plugin_cannot_run(caplog, monkeypatch):
    from vllm_guard.cli import scheduler_plugin

    for var, key in KEYS.items():  # serve's environment, where the keys come from
        monkeypatch.setenv(var, key)

    config = parse_config(
        BASE_CONFIG.replace("engine: {", "engine: {scheduler: guard, "), "t.yaml", KEYS
    )
    same, plugin = scheduler_plugin(config, "0.32.0")
    assert same is config
    assert plugin == guard_scheduler_cls()
    # No reserved slot; batch may queue S more inside vLLM.
    assert [c.slot_limit for c in config.classes] == [4, 8]

    fallback, plugin = scheduler_plugin(config, "0.33.1")
    assert plugin is None
    assert fallback.engine.scheduler == "vllm"
    assert [c.slot_limit for c in fallback.classes] == [4, 3]  # reserved_seqs: 1 applies
    assert "refuses to run on vLLM 0.33.1" in caplog.text
    assert "falling back to vLLM's own scheduler" in caplog.text


def test_serve_runs_the_plugin_by_default_where_it_can(monkeypatch):
    from vllm_guard.cli import scheduler_plugin

    for var, key in KEYS.items():
        monkeypatch.setenv(var, key)
    config = parse_config(BASE_CONFIG, "t.yaml", KEYS)  # engine.scheduler unset
    assert config.engine.scheduler is None
    assert [c.slot_limit for c in config.classes] == [4, 3]  # proxy mode: reservations
    chosen, plugin = scheduler_plugin(config, "0.32.0")
    assert plugin == guard_scheduler_cls()
    assert chosen.engine.scheduler == "guard"
    assert [c.slot_limit for c in chosen.classes] == [4, 8]
    fallback, plugin = scheduler_plugin(config, "0.31.2")
    assert plugin is None
    assert [c.slot_limit for c in fallback.classes] == [4, 3]
    pinned = parse_config(BASE_CONFIG.replace("engine: {", "engine: {scheduler: vllm, "), "t", KEYS)
    assert scheduler_plugin(pinned, "0.32.0") == (pinned, None)
