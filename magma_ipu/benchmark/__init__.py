"""Code used by the benchmark only, never by the runtime."""
