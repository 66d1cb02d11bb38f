"""segbackdoor testbed: backdoor attacks and defenses on semantic segmentation."""

__version__ = "0.1.0"
