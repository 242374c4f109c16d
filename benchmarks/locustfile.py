"""Locust load for vllm-guard (or vLLM directly): interactive chat users and batch users.

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 --headless \\
        -u 20 -r 20 -t 60s --csv results/locust/run \\
        --interactive-key "$CHAT_UI_KEY" --batch-key "$ETL_KEY"

Against vLLM directly add `--direct` (the classes' priorities go in the body instead of
coming from the tenants) and drop the keys. Without --headless it serves the web UI.
The users, their options and the TTFT entry are in vllm_guard/loadtest/users.py.
"""

from vllm_guard.loadtest.users import BatchUser, InteractiveUser

__all__ = ["BatchUser", "InteractiveUser"]
