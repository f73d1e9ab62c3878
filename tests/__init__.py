"""zoo's test suite; ``tests.helpers`` holds what the test files share."""
