"""From stored runs to numbers and pictures: stages, outcomes, intervals, figures, reports, the `Run` object."""
