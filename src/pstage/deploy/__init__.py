"""Deployment: one ONNX graph per run or ensemble, int8, the FastAPI server."""
