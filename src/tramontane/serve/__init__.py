"""The OpenAI- and Mistral-compatible HTTP server (FastAPI) in front of the serving engine."""
