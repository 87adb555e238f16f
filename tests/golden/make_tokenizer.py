"""Train the tiny example model's tokenizer: orchestrator/data/tiny-llama-tokenizer.json.

A byte-level BPE of 1024 tokens (ids 0-2 special: <unk>, <s>, </s>; any text encodes, since
every byte is a token) trained with the `tokenizers` library on this repository's README and
design notes. tiny-llama's vocabulary has 4096 rows, so every id fits; with seeded random
weights its completions are not language, but the path — text in, token ids through the
pipeline, text pieces out, stop at </s> — is the one a real checkpoint's tokenizer.json takes.

    .venv/bin/python tests/golden/make_tokenizer.py
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "orchestrator" / "data" / "tiny-llama-tokenizer.json"
SPECIAL = ["<unk>", "<s>", "</s>"]


def main() -> None:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [(ROOT / "README.md").read_text(encoding="utf-8")]
    tokenizer.train_from_iterator(texts, trainer)
    OUT.write_text(tokenizer.to_str() + "\n", encoding="utf-8")
    print(f"{OUT}: {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
