"""A stand-in tokenizer for tiny random models: token i is one character; id 2 ends a sequence."""

from __future__ import annotations


class CharTokenizer:
    stop_ids = frozenset({2})
    bos_id, eos_id, default_add_bos, chat_format = None, 2, False, "none"

    def piece(self, i: int) -> str:
        return chr(0x41 + i)

    def decode(self, ids, skip_special: bool = True) -> str:
        return "".join(self.piece(i) for i in ids if not (skip_special and i in self.stop_ids))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [ord(c) - 0x41 for c in text]

    def incremental_decoder(self):
        tok = self

        class Dec:
            def push(self, i: int) -> str:
                return tok.decode([i])

            def flush(self) -> str:
                return ""

        return Dec()
