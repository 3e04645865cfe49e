"""The TOML examples of docs/models.md and docs/agents-models.md load as peer configurations,
so the docs cannot drift from the parser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from peer.settings import SettingsError, load_settings

DOCS = Path(__file__).resolve().parents[3] / "docs"
BLOCK = re.compile(r"```toml\n(.*?)```", re.DOTALL)
KEY_ENV = re.compile(r'api_key_env\s*=\s*"(\w+)"')


def _blocks(name: str) -> list[str]:
    return BLOCK.findall((DOCS / name).read_text(encoding="utf-8"))


EXAMPLES = [
    (name, i, text)
    for name in ("models.md", "agents-models.md")
    for i, text in enumerate(_blocks(name))
]


def test_the_model_docs_show_every_kind_of_endpoint() -> None:
    text = "\n".join(_blocks("models.md"))
    for model in ("openai/", "anthropic/", "hosted_vllm/", "ollama_chat/"):
        assert f'model = "{model}' in text, model
    assert len(_blocks("models.md")) >= 6 and _blocks("agents-models.md")


@pytest.mark.parametrize(("name", "index", "text"), EXAMPLES, ids=lambda v: str(v)[:20])
def test_each_toml_example_loads(tmp_path: Path, name: str, index: int, text: str) -> None:
    path = tmp_path / "peer.toml"
    path.write_text(text, encoding="utf-8")
    env = {variable: "set-for-the-test" for variable in KEY_ENV.findall(text)}
    settings = load_settings({}, env, path)
    assert settings.agents or settings.llm is not None
    if env:
        # The key variables the example names are checked at load.
        with pytest.raises(SettingsError, match="is not set"):
            load_settings({}, {}, path)
