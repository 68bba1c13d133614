"""Benchmarks behind every performance figure the project quotes.

``python -m bench NAME`` runs one benchmark and prints its figures as one JSON object on
its last line, under the names the issues use. Benchmarks run real processes on loopback
and real time; they are never part of the test suite's assertions.
"""
