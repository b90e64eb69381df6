from birkhoff.train.secrets import REDACTED, redact


def test_secret_values_are_scrubbed_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-key")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    recipe = {"a": {"b": "s3cr3t-key", "c": ["x", "prefix-s3cr3t-key"], "d": 3}, "e": "plain"}
    assert redact(recipe) == {"a": {"b": REDACTED, "c": ["x", REDACTED], "d": 3}, "e": "plain"}
    assert recipe["a"]["b"] == "s3cr3t-key", "the input is not modified"


def test_nothing_changes_without_secrets_in_the_environment(monkeypatch):
    for name in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    recipe = {"a": ["", "x"], "b": None}
    assert redact(recipe) == recipe
