from qwen_vllm.cli.commands import entry

entry()
