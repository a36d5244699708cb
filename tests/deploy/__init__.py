"""Tests of the deployment: keys, enrolment, real SuperLink and SuperNodes."""
