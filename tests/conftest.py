import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_pair():
    from gsd_serve.models import load_default_pair

    return load_default_pair()


@pytest.fixture(scope="session")
def engine(default_pair):
    from gsd_serve.engine import Engine
    from gsd_serve.models import DEFAULT_DRAFT, SHIPPED_DRAFT_DIR, draft_output_ids
    from gsd_serve.prompts import stop_token_ids

    target, draft, tokenizer = default_pair
    ids = draft_output_ids(DEFAULT_DRAFT) if (SHIPPED_DRAFT_DIR / "config.json").exists() else None
    return Engine(target, draft, stop_token_ids=stop_token_ids(tokenizer, target), draft_output_ids=ids)


@pytest.fixture(scope="session")
def tokenizer(default_pair):
    return default_pair[2]
