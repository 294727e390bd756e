import pytest


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M (model, tokenizer), loaded once per test session."""
    from e3pruner.models import load_model

    return load_model("smollm2-135m")
