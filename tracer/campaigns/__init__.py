"""Many runs into one folder: the experiments matrix and length sweep machinery, module probes."""
