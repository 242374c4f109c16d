"""limits.yaml validation: every mistake names the file, the key path and the fix."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import BASE_CONFIG, KEYS
from vllm_guard.config import ConfigError, load_config, parse_config
from vllm_guard.proxy.auth import Authenticator

ROOT = Path(__file__).resolve().parents[2]


def _error(text: str, env=KEYS) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.yaml", env)
    return str(info.value)


def test_shipped_configs_load():
    for path in (ROOT / "configs" / "limits.yaml", None):
        config = load_config(path, KEYS)
        batch = config.classes_by_name["batch"]
        assert (config.max_num_seqs, batch.slot_limit) == (16, 14)


def test_slot_limits_subtract_more_urgent_reservations(config):
    assert [(c.name, c.slot_limit) for c in config.classes] == [("interactive", 4), ("batch", 3)]


def test_queue_ahead_raises_only_the_most_urgent_class_limit():
    text = BASE_CONFIG.replace("queue_ahead: 0", "queue_ahead: 3").replace(
        "  batch:", "  standard: {vllm_priority: 5, reserved_seqs: 1}\n  batch:"
    )
    config = parse_config(text, "t.yaml", KEYS)
    assert [(c.name, c.slot_limit) for c in config.classes] == [
        ("interactive", 4 + 3),
        ("standard", 4 - 1),
        ("batch", 4 - 2),
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("max_queue: 5", "max_qeue: 5"),
            "classes.batch.max_qeue: unknown key 'max_qeue'; allowed",
        ),
        (("max_queue: 5", "max_queue: lots"), "classes.batch.max_queue: Input should be a valid"),
        (("class: interactive", "class: vip"), "tenants.chat-ui.class: unknown class 'vip'"),
        (('"env:ETL_KEY"', '"sk-plain"'), "tenants.nightly-etl.api_keys.0: write the key as env:"),
        (('"env:ETL_KEY"', '"env:NOPE"'), "environment variable NOPE is not set"),
        (("reserved_seqs: 1", "reserved_seqs: 4"), "leaves the least urgent class no slot"),
        (("vllm_priority: 10", "vllm_priority: 0"), "share a vllm_priority"),
        (("engine: {", "engine: {bogus: 1, "), "engine.bogus: unknown key 'bogus'"),
    ],
)
def test_mistakes_are_named(change, expected):
    message = _error(BASE_CONFIG.replace(*change))
    assert message.startswith("bad.yaml: ")
    assert expected in message


def test_same_key_for_two_tenants_is_refused():
    assert "every key must identify one tenant" in _error(
        BASE_CONFIG, {"CHAT_UI_KEY": "k", "ETL_KEY": "k"}
    )


def test_not_yaml_and_not_a_mapping():
    assert "not valid YAML" in _error("classes: [")
    assert "expected a mapping" in _error("- 1")


def test_sha256_keys_authenticate_and_bad_digests_are_refused():
    digest = hashlib.sha256(b"hashed-key").hexdigest()
    text = BASE_CONFIG.replace('api_keys: ["env:ETL_KEY"]', f'api_key_sha256: ["{digest}"]')
    config = parse_config(text, "t.yaml", KEYS)
    auth = Authenticator(config.key_digests, config.anonymous)
    assert auth.tenant_for(b"Bearer hashed-key").name == "nightly-etl"
    assert auth.tenant_for(b"bearer chat-secret").name == "chat-ui"
    assert auth.tenant_for(b"Bearer etl-secret") is None
    assert auth.tenant_for(None) is None
    assert "64 lowercase hex" in _error(text.replace(digest, "abc"))


SECRET = "sk-live-0123456789abcdef"


@pytest.mark.parametrize(
    "change",
    [
        ('api_keys: ["env:CHAT_UI_KEY"]', f"api_keys: {SECRET}"),  # a plain key, not a list
        ('api_keys: ["env:CHAT_UI_KEY"]', f'api_keys: ["{SECRET}"]'),  # a plain key in it
        ('api_keys: ["env:CHAT_UI_KEY"]', f"api_keys: [{{key: {SECRET}}}]"),
        ('api_keys: ["env:CHAT_UI_KEY"]', f"api_key_sha256: {SECRET}"),
        ('api_keys: ["env:CHAT_UI_KEY"]', f'api_key_sha256: ["{SECRET}"]'),
        ("engine: {", f"guard: {{upstream_api_key: [{SECRET}]}}\nengine: {{"),
        ("engine: {", f"guard: {{engine_key: {{k: {SECRET}}}}}\nengine: {{"),
        ("engine: {", f"guard: {{cache_salt_secret: [{SECRET}]}}\nengine: {{"),
        ("engine: {", f"guard: {{upstream_api_key: {SECRET}}}\nengine: {{"),
        ('api_keys: ["env:CHAT_UI_KEY"]', f'api_keys: ["env:{SECRET}"]'),
    ],
)
def test_config_errors_never_print_a_key(change):
    """A key pasted into the config is an error that names where, never what."""
    with pytest.raises(ConfigError) as exc:
        parse_config(BASE_CONFIG.replace(*change), "test.yaml", KEYS)
    assert SECRET not in str(exc.value)
    assert "test.yaml" in str(exc.value)


def test_quota_store_takes_redis_urls_and_a_password_reference_only():
    text = BASE_CONFIG.replace(
        "engine:",
        "guard: {quota_store: 'rediss://redis.internal:6380/2', replicas: 3,"
        " quota_store_password: 'env:REDIS_PW'}\nengine:",
    )
    config = parse_config(text, "t.yaml", {**KEYS, "REDIS_PW": "pw-from-env"})
    assert config.guard.quota_store == "rediss://redis.internal:6380/2"
    assert config.quota_store_password == "pw-from-env"
    assert config.guard.replicas == 3
    assert [c.on_store_down for c in config.classes] == ["local", "local"]

    def guard(settings: str) -> str:
        return _error(BASE_CONFIG.replace("engine:", f"guard: {{{settings}}}\nengine:"))

    assert "expected memory or a Redis URL" in guard("quota_store: 'localhost:6379'")
    secret_url = guard("quota_store: 'redis://user:hunter2-pw@redis:6379/0'")
    assert "quota_store_password" in secret_url and "hunter2-pw" not in secret_url
    assert "hunter2-pw" not in guard("quota_store_password: 'hunter2-pw'")
    assert "REDIS_PW is not set" in guard("quota_store_password: 'env:REDIS_PW'")
    text = BASE_CONFIG.replace("max_wait_s: 60}", "max_wait_s: 60, on_store_down: reject}")
    assert [c.on_store_down for c in parse_config(text, "t.yaml", KEYS).classes] == [
        "local",
        "reject",
    ]


def test_keys_can_come_from_files_read_at_load(tmp_path):
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "chat").write_text("chat-key-from-file\n")  # a trailing newline is dropped
    config_file = tmp_path / "limits.yaml"
    config_file.write_text(
        BASE_CONFIG.replace('api_keys: ["env:CHAT_UI_KEY"]', 'api_keys: ["file:secrets/chat"]')
    )
    config = load_config(config_file, KEYS)
    digest = hashlib.sha256(b"chat-key-from-file").digest()
    assert config.key_digests[digest].name == "chat-ui"
    # A rotated file is what the next load reads.
    (secrets_dir / "chat").write_text("rotated-chat-key")
    config = load_config(config_file, KEYS)
    assert hashlib.sha256(b"rotated-chat-key").digest() in config.key_digests
    assert digest not in config.key_digests


def test_a_file_reference_that_cannot_be_read_names_no_secret(tmp_path):
    (tmp_path / "empty").write_text("\n")
    for ref, said in (
        ("file:empty", "names an empty file"),
        ("file:pasted-key-7f3a", "cannot read"),
    ):
        config_file = tmp_path / "limits.yaml"
        config_file.write_text(
            BASE_CONFIG.replace('api_keys: ["env:CHAT_UI_KEY"]', f'api_keys: ["{ref}"]')
        )
        with pytest.raises(ConfigError) as info:
            load_config(config_file, KEYS)
        assert said in str(info.value) and "pasted-key-7f3a" not in str(info.value)
        assert "tenants.chat-ui.api_keys.0" in str(info.value)
