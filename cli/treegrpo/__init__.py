"""treegrpo: a TreeGRPO trainer CLI for diffusers models, built on `diffusers_tree`."""

import logging

__version__ = "0.1.0"

# The console (`run/reporting.Reporter`) shows every warning once; without a handler here Python's last-resort
# handler printed each one a second time on stderr. Applications that configure logging still receive them.
logging.getLogger("treegrpo").addHandler(logging.NullHandler())
