"""`vllm-guard`: serve, proxy, check-config, demo, batch, tune."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_guard import __version__
from vllm_guard.config import CompiledConfig, ConfigError, load_config
from vllm_guard.core.classes import Tenant

if TYPE_CHECKING:
    from vllm_guard.engine.preemption import PreemptionPolicy
    from vllm_guard.proxy.server import Listen

log = logging.getLogger("vllm_guard.cli")

_CONFIG_HELP = (
    "limits file (YAML); default: the embedded one (classes interactive and batch, tenants "
    "chat-ui and nightly-etl with keys from $CHAT_UI_KEY and $ETL_KEY)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-guard",
        description="Admission control and priority scheduling in front of vLLM.",
    )
    p.add_argument("--version", action="version", version=f"vllm-guard {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="start vLLM as a supervised child and serve the guard in front of it",
        description="Start vLLM (python -m vllm.entrypoints.openai.api_server) on a private "
        "127.0.0.1 port with --max-num-seqs from the config and --scheduling-policy priority, "
        "and serve the guard on --host/--port. Unless the config says engine.scheduler: vllm, "
        "vLLM also loads vllm-guard's scheduler plugin (--scheduler-cls), which preempts "
        "batch work for interactive requests; where this vLLM cannot run it, the config's "
        "reserved slots apply instead. Arguments after -- go to vLLM unchanged.",
        epilog="example: vllm-guard serve --model tiny --config configs/limits.yaml -- "
        "--enforce-eager",
    )
    s.add_argument(
        "--model",
        required=True,
        help="model path or name for vLLM; 'tiny' builds (once, cached) a tiny "
        "random-weight Llama that serves on any CPU",
    )
    s.add_argument("--config", type=Path, help=_CONFIG_HELP)
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve the guard on (default 127.0.0.1; 0.0.0.0 for all)",
    )
    s.add_argument("--port", type=int, default=8000, help="guard port (default 8000)")
    _metrics_arguments(s)
    s.add_argument(
        "--vllm-port",
        type=int,
        default=0,
        help="vLLM's private port on 127.0.0.1 (default: a free one)",
    )
    s.add_argument(
        "--vllm-log", type=Path, help="write vLLM's output to this file instead of this terminal"
    )
    s.add_argument(
        "--engine-nice",
        type=int,
        choices=range(20),
        metavar="N",
        help="run vLLM at this nice value (and its session's autogroup), so its busy engine "
        "threads cannot starve the guard on shared cores (default: 10 with the CPU build, "
        "else 0)",
    )

    x = sub.add_parser(
        "proxy",
        help="guard a vLLM server that is already running",
        description="Guard a running vLLM. Its --max-num-seqs must match engine.max_num_seqs "
        "and it must run --scheduling-policy priority; with engine.scheduler: guard it must "
        "also run vllm-guard's scheduler plugin (check-config prints how to start it).",
    )
    x.add_argument(
        "--upstream",
        action="append",
        type=_upstream_url,
        help="vLLM base URL, http://host:port[/prefix] (plain HTTP: vLLM on a private "
        "network); repeat it for several engines serving the same model, each with "
        "engine.max_num_seqs slots (default: engine.upstreams in the config)",
    )
    x.add_argument("--config", type=Path, help=_CONFIG_HELP)
    x.add_argument("--host", default="127.0.0.1", help="address to serve the guard on")
    x.add_argument("--port", type=int, default=8000, help="guard port (default 8000)")
    _metrics_arguments(x)

    c = sub.add_parser("check-config", help="validate a limits file and print what it compiles to")
    c.add_argument("file", type=Path)

    r = sub.add_parser(
        "reload",
        help="reload a running guard's limits file (as SIGHUP does) and say how it went",
        description="Send SIGHUP to the guard process PID, which reads its --config file "
        "again: tenants, keys, limits, shadow and class queue settings change at once, "
        "without touching vLLM; requests under way finish under the rules they arrived "
        "with. A file that does not validate, or that changes engine.*, guard.* (but "
        "anonymous_tenant) or the classes themselves (these need a restart), changes "
        "nothing. Exits 0 when the guard reloaded, 1 when it kept its config, 2 when PID "
        "is not a vllm-guard.",
    )
    r.add_argument("--pid", type=int, required=True, help="the vllm-guard serve/proxy process")
    r.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for its answer")

    d = sub.add_parser(
        "demo",
        help="CPU end-to-end demonstration: a batch flood against interactive probes, "
        "straight to vLLM, through the guard with reserved slots, and through the guard "
        "with its scheduler plugin",
    )
    d.add_argument("--flood", type=int, default=200, help="streaming batch requests (default 200)")
    d.add_argument("--max-tokens", type=int, default=256, help="tokens per batch request")
    d.add_argument("--probes", type=int, default=30, help="interactive probes per phase")
    d.add_argument("--port", type=int, default=0, help="guard port (default: a free one)")
    d.add_argument("--json", type=Path, help="also write the results as JSON to this file")

    _add_batch_parser(sub)
    _add_tune_parser(sub)
    return p


_BATCH_DESCRIPTION = """\
Run an OpenAI Batch API file (JSONL: custom_id, method POST, url /v1/chat/completions or
/v1/completions, body) through vllm_guard.client.limited: local rate limits learned from the
server's x-ratelimit-* headers, retries at exactly retry-after-ms, adaptive concurrency.

The input is checked first: every bad line (not JSON, missing field, other method or url,
duplicate custom_id) is reported with its number and nothing is sent (exit 2). The output
has one line per input line, exactly once, in OpenAI's batch output format; failures are
records with `error` set (and the server's error body in `response` when there was one).
Re-running with the same output resumes: lines already there are skipped, a torn last
line is cut off. Exit 0 when every line succeeded, 1 when any failed or was not done."""


def _upstream_url(text: str) -> str:
    from vllm_guard.upstream.h1client import split_base_url

    try:
        split_base_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_batch_parser(sub: Any) -> None:
    # Defined here, not in batch.py: importing that module imports httpx (and ssl), which
    # must not happen before `tune` lets gevent patch the standard library.
    b = sub.add_parser(
        "batch",
        help="run an OpenAI Batch API file (JSONL) through the rate-limited client",
        description=_BATCH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("input", type=Path, help="input JSONL (custom_id, method, url, body)")
    b.add_argument("-o", "--output", type=Path, required=True, help="output JSONL (appended)")
    b.add_argument("--base-url", default="http://127.0.0.1:8000", help="server (default guard)")
    b.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY)")
    b.add_argument(
        "--class",
        dest="priority_class",
        default="batch",
        help="x-vllm-guard-class to send (default batch; '' for none)",
    )
    b.add_argument("--model", help="override every body's model")
    b.add_argument("--workers", type=int, default=32, help="most requests in flight (default 32)")
    b.add_argument("--rpm", type=float, help="local requests/min limit (default: learned)")
    b.add_argument("--tpm", type=float, help="local tokens/min limit (default: learned)")
    b.add_argument("--max-attempts", type=int, default=8, help="per request (default 8)")
    b.add_argument(
        "--retry-failed",
        action="store_true",
        help="on resume, drop the output's failure records and run those lines again",
    )
    b.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no live progress line"
    )


def _add_tune_parser(sub: Any) -> None:
    t = sub.add_parser(
        "tune",
        help="Locust capacity sweep against a running stack; writes a tuned limits.yaml",
        description="Hold a fixed interactive load, ramp batch users step by step, record "
        "interactive TTFT, batch tokens/s, queue depths and KV use at each step, stop at the "
        "knee, and tune the whole --config from the best step that keeps TTFT p95 under "
        "--objective-ms: every batch tenant's max_concurrent and tokens_per_minute (shares "
        "by weight), the interactive class's reserved_seqs (not with the scheduler plugin), "
        "and each batch class's max_queue from the measured drain rate. Writes limits.yaml (a "
        "comment on each tuned line says what was measured), report.md and plots. "
        "--measure N runs one step at N batch users, to check tuned limits.",
    )
    t.add_argument("--url", default="http://127.0.0.1:8000", help="the guard (default loopback)")
    t.add_argument(
        "--metrics-url",
        help="where the guard serves /metrics (default: --url, on the config's "
        "guard.metrics_port where it sets one)",
    )
    t.add_argument("--config", type=Path, required=True, help="the limits file the stack runs")
    t.add_argument("--interactive-key", required=True, help="an interactive tenant's key")
    t.add_argument("--batch-key", required=True, help="a batch tenant's key (its load is swept)")
    t.add_argument("--objective-ms", type=float, required=True, help="interactive TTFT p95 goal")
    t.add_argument("--interactive-users", type=int, default=4, help="fixed (default 4)")
    t.add_argument("--interactive-wait", default="0.2,0.5", help="think time min,max in s")
    t.add_argument(
        "--batch-steps", default="2,4,8,12,16,24,32", help="batch users per step (default "
        "2,4,8,12,16,24,32)"
    )  # fmt: skip
    t.add_argument("--batch-max-tokens", type=int, default=256, help="per batch request")
    t.add_argument("--step-s", type=float, default=30.0, help="measured seconds per step")
    t.add_argument("--warmup-s", type=float, default=5.0, help="unmeasured seconds per step")
    t.add_argument("--model", default="tiny", help="model name in the requests")
    t.add_argument("--measure", type=int, metavar="N", help="one step at N batch users")
    t.add_argument("--out", type=Path, default=Path("results/tune"), help="output folder")


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args_in:
        cut = args_in.index("--")
        args_in, extra = args_in[:cut], args_in[cut + 1 :]
    args = _parser().parse_args(args_in)
    if extra and args.command != "serve":
        print("vllm-guard: arguments after -- are only for serve", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if args.command == "demo":
        from vllm_guard.demo.run import run_demo

        return run_demo(args)
    if args.command == "tune":
        try:  # patches the standard library for gevent
            from vllm_guard.loadtest.tune import main_tune
        except ImportError as exc:
            print(
                f"vllm-guard tune needs Locust ({exc.name} is missing): pip install "
                "'vllm-guard[tune]' (scripts/install.sh installs it)",
                file=sys.stderr,
            )
            return 2
        return main_tune(args)
    if args.command == "batch":
        from vllm_guard.client.batch import main_batch

        return main_batch(args)
    if args.command == "reload":
        from vllm_guard.proxy.reload import request_reload

        code, message = request_reload(args.pid, args.timeout)
        print(f"vllm-guard: {message}", file=sys.stderr if code else sys.stdout)
        return code

    try:
        config = load_config(args.config if args.command != "check-config" else args.file)
    except ConfigError as exc:
        print(f"vllm-guard: {exc}", file=sys.stderr)
        return 2

    if args.command == "check-config":
        print(f"{config.source}: OK")
        eng = config.engine
        print(
            f"engine: max_num_seqs={config.max_num_seqs} queue_ahead={eng.queue_ahead} "
            f"kv_admission={eng.kv_admission} "
            f"kv_watermark={eng.kv_watermark:g} on_stale={eng.on_stale} "
            f"scheduler={eng.scheduler or _UNSET_SCHEDULER}"
        )
        if eng.scheduler != "vllm":
            from vllm_guard.engine.plugin import METRICS_ENV
            from vllm_guard.engine.preemption import POLICY_ENV

            policy = plugin_policy(config).to_env()
            print(
                "scheduler plugin (serve sets it up; in proxy mode start vLLM with it): "
                "--scheduler-cls vllm_guard.engine.scheduler.GuardScheduler "
                "(GuardAsyncScheduler where vLLM runs async scheduling) and the environment "
                f"{POLICY_ENV}='{policy}'; for its metrics also {METRICS_ENV}=FILE, and "
                "engine.scheduler_metrics_file: FILE here"
            )
        guard = config.guard
        if guard.quota_store == "memory":
            print("quota store: memory (this process; replicas would each keep every limit)")
        else:
            print(
                f"quota store: {guard.quota_store} (shared by {guard.replicas} replica(s); "
                f"password {'set' if config.quota_store_password else 'none'}; timeout "
                f"{guard.quota_store_timeout_s * 1000:g} ms; "
                f"leases {guard.quota_store_lease_s:g} s)"
            )
        if eng.upstreams:
            print(f"engines (proxy): {len(eng.upstreams)}")
            for i, url in enumerate(eng.upstreams):
                print(f"  engine {i}: {url} (max_num_seqs={config.max_num_seqs})")
        for c in config.classes:
            print(
                f"class {c.name}: vllm_priority={c.vllm_priority} slot_limit={c.slot_limit} "
                f"max_queue={c.max_queue} max_wait_s={c.max_wait_s:g} "
                f"queueing={'fair' if c.fair_queueing else 'fifo'} "
                f"on_limit={'wait' if c.wait_on_limit else 'reject'} "
                f"kv_fraction={c.kv_fraction:g} "
                f"kv_admission={'worst_case' if c.kv_admission else 'off (preemptible)'}"
                + (" engine_makes_room" if c.engine_makes_room else "")
                + (f" on_store_down={c.on_store_down}" if guard.quota_store != "memory" else "")
            )
        for t in config.tenants.values():
            print(
                f"tenant {t.name}: class={t.priority_class.name} weight={t.weight:g} "
                f"limits={_limits_text(t)}"
                + (" (shadow: counted, not enforced)" if t.shadow else "")
            )
        return 0

    from vllm_guard.proxy import server

    if (args.metrics_port or config.guard.metrics_port) == args.port:
        print("vllm-guard: the metrics port must differ from --port", file=sys.stderr)
        return 2
    if args.command == "proxy":
        upstreams = args.upstream or list(config.engine.upstreams)
        if not upstreams:
            print(
                "vllm-guard: proxy needs an engine: --upstream URL (repeatable) or "
                "engine.upstreams in the config",
                file=sys.stderr,
            )
            return 2
        listen = _listen(args, config)
        return server.run(lambda: server.serve_proxy(config, upstreams, listen))

    from vllm_guard.engine.launcher import (
        VllmSupervisor,
        default_engine_nice,
        free_port,
        vllm_command,
        vllm_env,
    )
    from vllm_guard.engine.middleware import HEADER as ENGINE_KEY_HEADER
    from vllm_guard.engine.middleware import KEY_ENV as ENGINE_KEY_ENV
    from vllm_guard.engine.plugin import METRICS_ENV, installed_vllm_version
    from vllm_guard.engine.preemption import POLICY_ENV
    from vllm_guard.engine.state import EngineState

    tiny = args.model == "tiny"
    model = args.model
    if tiny:
        from vllm_guard.engine.tiny_model import ensure_tiny_model

        model = str(ensure_tiny_model())
    port = args.vllm_port or free_port()
    config, plugin = scheduler_plugin(config, installed_vllm_version())
    eng = config.engine
    try:
        cmd = vllm_command(model, port, config.max_num_seqs, extra, tiny, plugin)
    except ValueError as exc:
        print(f"vllm-guard: {exc}", file=sys.stderr)
        return 2
    env = vllm_env(os.environ, tiny)
    # The key vLLM's middleware requires (its environment, not argv, which `ps` shows).
    engine_key = config.engine_key or os.environ.get(ENGINE_KEY_ENV) or secrets.token_urlsafe(32)
    env[ENGINE_KEY_ENV] = engine_key
    plugin_dir = plugin_metrics = None
    if plugin is not None:  # the scheduler is built in vLLM's engine process: tell it there
        env[POLICY_ENV] = plugin_policy(config).to_env()
        plugin_dir = Path(tempfile.mkdtemp(prefix="vllm-guard-"))  # mode 0700
        plugin_metrics = plugin_dir / "scheduler.prom"
        env[METRICS_ENV] = str(plugin_metrics)
    engine = EngineState()
    nice = default_engine_nice() if args.engine_nice is None else args.engine_nice
    supervisor = VllmSupervisor(
        cmd, env, port, engine, args.vllm_log, nice=nice, headers={ENGINE_KEY_HEADER: engine_key}
    )
    try:
        return server.run(
            lambda: server.serve_with_vllm(
                config, supervisor, engine, _listen(args, config), plugin_metrics, engine_key
            )
        )
    finally:
        if plugin_dir is not None:
            shutil.rmtree(plugin_dir, ignore_errors=True)


def _metrics_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics and /metrics/engine only on this port, and 404 for them on the "
        "public one (default: guard.metrics_port in the config; unset: the public port)",
    )
    p.add_argument(
        "--metrics-host",
        help="address of --metrics-port (default: guard.metrics_host, 127.0.0.1)",
    )


def _listen(args: argparse.Namespace, config: CompiledConfig) -> Listen:
    from vllm_guard.proxy.server import Listen

    guard = config.guard
    return Listen(
        args.host,
        args.port,
        args.metrics_host or guard.metrics_host,
        args.metrics_port or guard.metrics_port,
    )


_UNSET_SCHEDULER = "unset (serve: guard where vLLM supports it; proxy: vllm)"


def plugin_policy(config: CompiledConfig) -> PreemptionPolicy:
    """What the scheduler plugin needs from the config, for vLLM's engine process."""
    from vllm_guard.engine.preemption import PreemptionPolicy

    eng = config.engine
    return PreemptionPolicy(
        urgent_max_priority=config.classes[0].vllm_priority,
        max_preemptions_per_step=eng.max_preemptions_per_step,
        max_preemptions_per_request=eng.max_preemptions_per_request,
        urgent_step_alone=eng.urgent_step_alone,
        class_names={str(c.vllm_priority): c.name for c in config.classes},
    )


def scheduler_plugin(
    config: CompiledConfig, vllm_version: str | None
) -> tuple[CompiledConfig, str | None]:
    """`serve`'s choice of scheduler: the config to run and the `--scheduler-cls` for vLLM.
    The plugin runs unless the config says `engine.scheduler: vllm` or it cannot run on this
    vLLM; then the same file is compiled with its reservations (scheduler `vllm`), and the
    log says why when the config had asked for the plugin."""
    from vllm_guard.engine.launcher import guard_scheduler_cls
    from vllm_guard.engine.plugin import refusal

    asked = config.engine.scheduler
    if asked == "vllm":
        return config, None
    reason = refusal(vllm_version)
    if reason is None:
        plugin_config = config if asked == "guard" else config.with_scheduler("guard", os.environ)
        return plugin_config, guard_scheduler_cls()
    if asked == "guard":
        log.warning(
            "engine.scheduler: guard: %s; falling back to vLLM's own scheduler, with the "
            "classes' reserved_seqs/reserved_kv and worst-case KV reservations",
            reason,
        )
    else:
        log.info("the scheduler plugin does not run here (%s): reserved slots", reason)
    return config.with_scheduler("vllm", os.environ), None


def _limits_text(tenant: Tenant) -> str:
    limits = tenant.limits
    if limits is None:
        return "none"
    parts = [
        f"{name}={value:.0f}"
        for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent")
        if (value := getattr(limits, name)) is not None
    ]
    parts += [f"burst.{dim}={cap:.0f}" for dim, cap in (limits.burst or {}).items()]
    return " ".join(parts)
