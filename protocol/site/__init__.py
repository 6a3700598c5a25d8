"""Site membership and sealed sticks: the rules of who may join a site and read its bundles."""
