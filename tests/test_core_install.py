"""The core install generates text without torch or transformers (only the export extra needs them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_generate_without_torch(tiny_text_package):
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "transformers", "gguf", "accelerate"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import onnxopt, onnxopt.cli
        gen = onnxopt.load({str(tiny_text_package)!r})
        result = gen.generate("Hello", max_new_tokens=4)
        stream = gen.stream([{{"role": "user", "content": "Hi"}}], max_new_tokens=4)
        text = "".join(stream)
        assert result.new_tokens == 4 and stream.result.new_tokens == 4, (result, stream.result)
        assert not any(m in sys.modules and sys.modules[m] is not None for m in ("torch", "transformers"))
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
