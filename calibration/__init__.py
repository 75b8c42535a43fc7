"""Calibration data readers, observers, calibration tables and weight-quantization recipes.

    reader.py      token windows streamed from text files (bounded memory)
    forward.py     one prefill pass over a window with logits at every position (eval, calibration)
    observers.py   streaming activation statistics: min-max, |x| histogram (percentile, MSE), abs-mean
    table.py       `onnxopt calibrate`: the observed graph, the resumable calibration table
    blockwise.py   MatMulNBits blockwise quantization and its NumPy reference
    awq.py         AWQ per-input-channel scale search
    smoothquant.py W8A8 Q/DQ (int8 and float8 E4M3) with SmoothQuant smoothing
    hessian.py     input second moments E[x x^T] per MatMul input (GPTQ's calibration pass)
    gptq.py        GPTQ error-compensating rounding on a fixed per-column grid

The graph rewrite and the perplexity gate are onnxopt/quantize.py; perplexity is onnxopt/evaluate.py.
"""
