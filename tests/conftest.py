import pytest

from vllm_guard.config import parse_config

BASE_CONFIG = """
engine: {max_num_seqs: 4, queue_ahead: 0}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 1, max_queue: 3, max_wait_s: 5}
  batch: {vllm_priority: 10, max_queue: 5, max_wait_s: 60}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
  nightly-etl: {class: batch, api_keys: ["env:ETL_KEY"]}
"""
KEYS = {"CHAT_UI_KEY": "chat-secret", "ETL_KEY": "etl-secret"}


@pytest.fixture
def config():
    return parse_config(BASE_CONFIG, "test.yaml", KEYS)
