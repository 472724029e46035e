"""Tool calling: the request side (tools, tool_choice, prompts, call grammars; request.py) and the parser
of the calls a model writes (parser.py)."""
