"""pytest robustness suites: a zoo and a defense become tests that can fail.

    pytest --pyargs testbed.suites --defense fine-pruning --zoo ZOO/ --max-asr 20 --max-miou-drop 3

The plugin (``testbed.suites.plugin``, registered through the ``pytest11`` entry point) adds the options and the
fixtures ``zoo``, ``zoo_entry``, ``defense`` and ``score``; ``suites/test_robustness.py`` holds the
generated criteria.  See docs/suites.md.
"""
