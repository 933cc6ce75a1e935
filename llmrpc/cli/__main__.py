"""``python -m llmrpc.cli server|head|run|plan|serve|status ...``"""

from llmrpc.cli import main

main()
