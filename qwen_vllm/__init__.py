"""Serve the Qwen v1 model family on current vLLM.

Importing this package is cheap: vLLM loads the plugin entry point in every
process, and the control plane never imports vLLM or torch.
"""

__version__ = "0.1.0"

# The name the embedded demo model is served under; the control plane knows it
# without reaching the checkpoint tools.
DEMO_MODEL_NAME = "qwen-v1-demo"
