"""The Gradio demo over the chan library."""
