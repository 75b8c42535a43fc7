"""The package's tokenizer, with no torch or transformers: `tokenizers` plus a sandboxed chat template.

Chat templates come from model files, which are untrusted: they render in Jinja's
ImmutableSandboxedEnvironment, so a template cannot reach Python internals or mutate its inputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from onnxopt.errors import GenerationError, PackageError

logger = logging.getLogger(__name__)


class TextTokenizer:
    def __init__(self, package_dir: Path, *, eos_token_ids: list[int]):
        from tokenizers import Tokenizer

        path = Path(package_dir) / "tokenizer.json"
        if not path.is_file():
            raise PackageError(f"{package_dir}: the package has no tokenizer.json; pass token ids instead of text")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise PackageError(f"{path}: cannot read tokenizer ({e})") from e
        config_path = Path(package_dir) / "tokenizer_config.json"
        self._config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = Path(package_dir) / "chat_template.jinja"
        template = template_path.read_text() if template_path.is_file() else self._config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template
        self.eos_token_ids = list(eos_token_ids)
        # Padding only fills masked positions; any id works, eos is always in the vocabulary.
        self.pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self._compiled = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render chat messages the way transformers' apply_chat_template does, sandboxed."""
        if not self.chat_template:
            raise GenerationError(
                "--chat: this model's tokenizer has no chat template; drop --chat and write the prompt as plain text"
            )
        _check_messages(messages)
        from jinja2 import TemplateError
        from jinja2.sandbox import SecurityError

        try:
            return self._template().render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=_token_str(self._config.get("bos_token")),
                eos_token=_token_str(self._config.get("eos_token")),
            )
        except SecurityError as e:
            raise PackageError(f"chat template: refused an unsafe operation ({e})") from e
        except TemplateError as e:
            raise PackageError(f"chat template: failed to render ({e})") from e

    def _template(self):
        if self._compiled is None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
            try:
                self._compiled = env.from_string(self.chat_template)
            except TemplateError as e:
                raise PackageError(f"chat template: not a valid Jinja template ({e})") from e
        return self._compiled


def _token_str(token) -> str:
    if isinstance(token, dict):  # AddedToken serialized as {"content": ...}
        return token.get("content", "")
    return token or ""


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise GenerationError("chat messages: expected a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise GenerationError(f"chat messages[{i}]: expected {{'role': str, 'content': str}}, got {m!r}")
