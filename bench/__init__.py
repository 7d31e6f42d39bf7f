"""The benchmark: our bridge against a naive bridge and against the broker's own ceiling.

Why a package of small processes: on a shared 2-core machine the numbers only
mean something when every part (broker, mock LLM, system under test, load
generator) is its own process whose CPU and memory can be read from /proc.
`python -m bench --help` lists the options; docs/performance.md explains the table.
"""
