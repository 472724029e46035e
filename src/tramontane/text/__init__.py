"""Text: the `Tokenizer` protocol (mistral-common, `tokenizers`, GGUF vocabularies), chat templates and
structured-output grammars over a vocabulary. Imports only errors and config."""
