"""Speed and memory benchmarks against hand-written references and peer libraries; run from the
repository root as ``python -m benchmarks.<name>``. ``benchmarks/peers/`` holds the scripts the peer
venvs run (as plain scripts, in a subprocess).
"""
