// scvi-cli as Nextflow DSL2 processes: train, then embed. Each process writes versions.yml.
//
//   include { SCVI_TRAIN; SCVI_EMBED } from './scvi_cli.nf'
//   workflow {
//       data = Channel.fromPath(params.h5ad).map { f -> [[id: f.baseName], f] }
//       SCVI_TRAIN(data, file(params.spec))
//       SCVI_EMBED(SCVI_TRAIN.out.model.join(data))
//   }
//
// GPU: give the process an accelerator (e.g. `accelerator 1` in a config for withName: SCVI_TRAIN);
// the command then asks for CUDA, and exits with code 3 if the node has none.

process SCVI_TRAIN {
    tag "${meta.id}"
    label 'process_medium'

    input:
    tuple val(meta), path(h5ad)
    path spec

    output:
    tuple val(meta), path("${meta.id}.ckpt"), emit: model
    tuple val(meta), path("${meta.id}.history.csv"), emit: history
    path "${meta.id}.train.log", emit: log
    path "versions.yml", emit: versions

    script:
    def device = task.accelerator ? 'cuda' : 'cpu'
    def extra = task.ext.args ?: ''
    """
    scvi-cli train ${h5ad} --spec ${spec} --out ${meta.id}.ckpt \\
        --device ${device} --threads ${task.cpus} --quiet \\
        --log-file ${meta.id}.train.log --checkpoint-every 10 --resume ${extra}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scvi-cli: \$(scvi-cli --version | sed 's/scvi-cli //')
        torch: \$(python -c 'import torch; print(torch.__version__)')
    END_VERSIONS
    """

    stub:
    """
    touch ${meta.id}.ckpt ${meta.id}.history.csv ${meta.id}.train.log
    echo '"${task.process}": {scvi-cli: stub}' > versions.yml
    """
}

process SCVI_EMBED {
    tag "${meta.id}"
    label 'process_low'

    input:
    tuple val(meta), path(model), path(h5ad)

    output:
    tuple val(meta), path("${meta.id}.latent.h5ad"), emit: latent
    path "versions.yml", emit: versions

    script:
    def device = task.accelerator ? 'cuda' : 'cpu'
    """
    scvi-cli embed ${model} ${h5ad} --out ${meta.id}.latent.h5ad --minimal \\
        --device ${device} --threads ${task.cpus} --quiet

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scvi-cli: \$(scvi-cli --version | sed 's/scvi-cli //')
    END_VERSIONS
    """
}
