"""Decisions with no I/O: given what the store read, what should happen.

Every function here takes plain values and returns plain values or instructions; the
services carry them out through `shared/store/`. Tests call them with tables of inputs.
"""
