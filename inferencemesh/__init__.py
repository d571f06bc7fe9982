"""InferenceMesh: decentralized pipeline-parallel LLM inference.

The compiled data plane lives in ``inferencemesh._core``; it is imported lazily by the modules that
need it so that pure control-plane code (DHT, compute) imports without it.
"""

__version__ = "0.1.0"
