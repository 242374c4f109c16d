"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas (offline), and
agree with each other and with the guard: its limits file loads, its command line parses,
the engine's slots, plugin policy and replica count match the config."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from vllm_guard.cli import _parser, plugin_policy
from vllm_guard.config import parse_config

DEPLOY = Path(__file__).parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
KUBERNETES = "1.30.0"


def _docs() -> list[dict]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


def _find(kind: str, name: str) -> dict:
    return next(d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name)


def _container(deployment: str) -> dict:
    return _find("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def _limits():
    text = _find("ConfigMap", "vllm-guard-limits")["data"]["limits.yaml"]
    env = {n: "x" * 16 for n in ("CHAT_UI_KEY", "ETL_KEY", "GUARD_SALT", "REDIS_PASSWORD")}
    env |= {"VLLM_GUARD_ENGINE_KEY": "engine-key", "ETL_KEY": "another-key"}
    return parse_config(text, "deploy/kubernetes/guard.yaml", env)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_guards_limits_file_loads_and_matches_the_deployment():
    config = _limits()
    assert config.guard.quota_store.startswith("redis://vllm-guard-redis:")
    assert config.guard.replicas == _find("Deployment", "vllm-guard")["spec"]["replicas"]
    args = _parser().parse_args(
        _container("vllm-guard")["command"][1:] + _container("vllm-guard")["args"]
    )
    assert args.upstream == ["http://vllm:8000"]


def test_the_engine_runs_what_the_guards_config_expects():
    config = _limits()
    engine = _container("vllm")
    args = dict(a.removeprefix("--").split("=", 1) for a in engine["args"])
    assert int(args["max-num-seqs"]) == config.max_num_seqs
    assert args["scheduling-policy"] == "priority"
    assert args["scheduler-cls"].startswith("vllm_guard.engine.scheduler.")
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert json.loads(env["VLLM_GUARD_SCHEDULER_POLICY"]) == json.loads(
        plugin_policy(config).to_env()
    )


COMPOSE = DEPLOY.parent / "compose"


def test_the_compose_file_agrees_with_its_limits_and_the_guard():
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    services = compose["services"]
    env = {n: "y" * 16 for n in ("GUARD_SALT", "REDIS_PASSWORD", "VLLM_GUARD_ENGINE_KEY")}
    env |= {"CHAT_UI_KEY": "chat-key-123456", "ETL_KEY": "etl-key-654321"}
    config = parse_config((COMPOSE / "limits.yaml").read_text(), "compose/limits.yaml", env)
    guards = [s for s in services.values() if s.get("entrypoint") == ["vllm-guard"]]
    engines = {n: s for n, s in services.items() if "vllm.entrypoints" in str(s.get("entrypoint"))}
    assert len(guards) == config.guard.replicas == 2 and len(engines) == 2
    for guard in guards:
        args = _parser().parse_args(guard["command"])
        assert [u.split("//")[1].split(":")[0] for u in args.upstream] == sorted(engines)
        assert set(guard["environment"]) >= {"VLLM_GUARD_ENGINE_KEY", "REDIS_PASSWORD"}
    assert config.guard.quota_store.startswith("redis://redis:")
    for engine in engines.values():
        flags = dict(a.removeprefix("--").split("=", 1) for a in engine["command"])
        assert int(flags["max-num-seqs"]) == config.max_num_seqs
        policy = engine["environment"]["VLLM_GUARD_SCHEDULER_POLICY"]
        assert json.loads(policy) == json.loads(plugin_policy(config).to_env())
