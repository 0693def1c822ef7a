"""The one error DP-SGD raises for configurations under which its epsilon would not hold."""


class PrivacyError(ValueError):
    """A configuration under which the reported epsilon would not hold."""
