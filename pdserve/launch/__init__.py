"""The `pdserve` command: one subcommand per role (cli.py), `pdserve up` (cluster.py: a local cluster of one
process per role, supervised) and `pdserve generate` (generate.py: offline, one process); gpus.py places
nodes on GPUs, up_process.py drives a `pdserve up` from outside (benchmarks, tests). The only package that
knows every role; nothing imports it but benchmarks and tests.
"""
