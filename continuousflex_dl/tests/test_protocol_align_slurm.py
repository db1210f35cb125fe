"""HEMNMA alignment on a real SLURM cluster (one node on localhost): each chunk is an sbatch job.

Skipped, saying why, where Debian's slurm-wlm and munge are missing or the tests do not run
as root (``.ci/run`` installs them on CI, which runs as root).
"""
import os
import tempfile

import numpy as np
from pyworkflow.constants import QUEUE_FOR_JOBS
from pyworkflow.project import Manager

from continuousflex_dl import convert
from continuousflex_dl.protocols import FlexDLProtAlign, FlexDLProtSynthesize
from continuousflex_dl.tests.base import FlexDLTestBase
from continuousflex_dl.tests.slurm_cluster import PARTITION, LocalSlurm

N_IMAGES, CHUNK = 12, 3


class TestAlignOnSlurm(FlexDLTestBase):
    @classmethod
    def setUpClass(cls):
        cls.slurm = LocalSlurm.start_or_skip(tempfile.mkdtemp(prefix="slurm-"))
        cls._env = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = cls.slurm.env["SLURM_CONF"]  # for the protocol's sbatch and squeue
        try:
            cls._makeProject()
        except BaseException:  # tearDownClass does not run after a failed setUpClass
            cls.tearDownClass()
            raise

    @classmethod
    def _makeProject(cls):
        hosts = cls.slurm.hosts_conf(os.path.join(cls.slurm.root, "hosts.conf"))
        cls.proj = Manager().createProject(cls.__name__, hostsConf=str(hosts))
        cls.outputPath = cls.proj.path
        os.chdir(cls.proj.path)
        cls.modes = cls.computeTestModes()
        synth = cls.newProtocol(FlexDLProtSynthesize, inputModes=cls.modes, modeList="7-9",
                                numberOfImages=N_IMAGES, boxSize=32, samplingRate=3.0, maxShift=2.0,
                                applyCTF=False, addNoise=False, seed=2)
        cls.launchProtocol(synth)
        cls.particles = synth.outputParticles

    @classmethod
    def tearDownClass(cls):
        cls.slurm.stop()
        if cls._env is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = cls._env

    def _align(self, queue: bool):
        prot = self.newProtocol(FlexDLProtAlign, inputParticles=self.particles, inputModes=self.modes,
                                modeList="7-9", workingSize=32, chunkSize=CHUNK, effort=0, maxShift=3.0,
                                numberOfThreads=3, useGpu=False)
        if queue:  # "Use queue for steps": the protocol runs here, each runJob is an sbatch job
            prot._useQueue.set(True)
            prot.setQueueParams([PARTITION, {"CPUS_PER_JOB": "1", QUEUE_FOR_JOBS: "Y"}])
        self.launchProtocol(prot)
        return prot

    def test_each_chunk_is_an_sbatch_job_and_the_output_equals_a_local_run(self):
        local = self._align(queue=False)
        self.assertEqual(self.slurm.finished_jobs(), [])  # local chunks never reach the queue
        queued = self._align(queue=True)
        jobs = [j for j in self.slurm.finished_jobs() if j["JobName"].startswith(queued.strId() + "-")]
        print("sacct --completion:", [(j["JobID"], j["JobName"], j["State"]) for j in jobs])
        self.assertEqual(len(jobs), N_IMAGES // CHUNK, jobs)
        self.assertEqual(len({j["JobID"] for j in jobs}), N_IMAGES // CHUNK)
        self.assertTrue(all(j["State"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs), jobs)
        a = convert.read_particles(local.outputParticles, need_amplitudes=True)
        b = convert.read_particles(queued.outputParticles, need_amplitudes=True)
        np.testing.assert_array_equal(a.ids, b.ids)
        self.assertEqual(convert.flex_mode_numbers(queued.outputParticles), [7, 8, 9])
        # Same code on the same images; thread counts may differ, so equal to float32 round-off.
        np.testing.assert_allclose(b.amplitudes, a.amplitudes, atol=1e-2)
        np.testing.assert_allclose(b.shifts, a.shifts, atol=1e-3)
        gt = convert.read_particles(self.particles, need_amplitudes=True)
        self.assertLess(np.abs(b.amplitudes - gt.amplitudes).max(), 5.0)
