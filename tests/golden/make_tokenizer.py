"""Train the tiny example model's tokenizer: orchestrator/data/tiny-llama-tokenizer.json.

A byte-level BPE of 4096 tokens — tiny-llama's vocabulary, so every id the model can emit is a
token — (ids 0-2 special: <unk>, <s>, </s>; any text encodes, since every byte is a token)
trained with the `tokenizers` library on this repository's Markdown and Python files. With
seeded random weights the model's completions are not language, but the path — text in, token
ids through the pipeline, text pieces out, stop at </s> — is the one a real checkpoint's
tokenizer.json takes.

    .venv/bin/python tests/golden/make_tokenizer.py
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "orchestrator" / "data" / "tiny-llama-tokenizer.json"
SPECIAL = ["<unk>", "<s>", "</s>"]
PACKAGES = ("placement", "shardformat", "agents", "orchestrator", "security")


def main() -> None:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = sorted(ROOT.glob("*.md")) + sorted(
        p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name
    )
    texts = [p.read_text(encoding="utf-8") for p in files]
    tokenizer.train_from_iterator(texts, trainer)
    OUT.write_text(tokenizer.to_str() + "\n", encoding="utf-8")
    print(f"{OUT}: {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
