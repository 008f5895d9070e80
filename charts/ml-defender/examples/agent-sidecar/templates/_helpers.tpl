{{/*
Naming, labels and shared fragments. Every template takes its names and labels from here so a
rename or a new label happens in one place.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "ml-defender.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified release name. Kept to 40 characters so "<fullname>-etcd-headless" and the etcd pod
DNS names stay inside the 63-character label limit.
*/}}
{{- define "ml-defender.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* name-version, as helm.sh/chart wants it. */}}
{{- define "ml-defender.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels for selectors: only name and instance, because selectors are immutable. */}}
{{- define "ml-defender.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ml-defender.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels for every object. */}}
{{- define "ml-defender.labels" -}}
helm.sh/chart: {{ include "ml-defender.chart" . }}
{{ include "ml-defender.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ml-defender
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Per-component labels: call with (dict "ctx" $ "component" "etcd"). */}}
{{- define "ml-defender.componentLabels" -}}
{{ include "ml-defender.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ml-defender.componentSelectorLabels" -}}
{{ include "ml-defender.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* ---------------------------------------------------------------- names of objects */}}

{{- define "ml-defender.operator.fullname" -}}
{{- printf "%s-operator" (include "ml-defender.fullname" .) -}}
{{- end -}}

{{- define "ml-defender.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "ml-defender.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ml-defender.config.fullname" -}}
{{- printf "%s-config" (include "ml-defender.fullname" .) -}}
{{- end -}}

{{/* The Secret holding the shared keyring (same name in every namespace it is copied to). */}}
{{- define "ml-defender.keyringSecretName" -}}
{{- .Values.operator.keyring.secretName -}}
{{- end -}}

{{- define "ml-defender.etcd.fullname" -}}
{{- printf "%s-etcd" (include "ml-defender.fullname" .) -}}
{{- end -}}

{{- define "ml-defender.etcd.headlessName" -}}
{{- printf "%s-etcd-headless" (include "ml-defender.fullname" .) -}}
{{- end -}}

{{/* ---------------------------------------------------------------- images */}}

{{/* Call with (dict "image" .Values.x.image "default" "tag-if-empty"). */}}
{{- define "ml-defender.imageRef" -}}
{{- $tag := default .default .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s/%s@%s" .image.registry .image.repository .image.digest -}}
{{- else if .image.registry -}}
{{- printf "%s/%s:%s" .image.registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "ml-defender.image" -}}
{{- include "ml-defender.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) -}}
{{- end -}}

{{- define "ml-defender.etcd.image" -}}
{{- include "ml-defender.imageRef" (dict "image" .Values.etcd.image "default" "v3.6.16") -}}
{{- end -}}

{{- define "ml-defender.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- etcd addressing */}}

{{- define "ml-defender.etcd.clientScheme" -}}
{{- ternary "https" "http" .Values.etcd.tls.client.enabled -}}
{{- end -}}

{{- define "ml-defender.etcd.peerScheme" -}}
{{- ternary "https" "http" .Values.etcd.tls.peer.enabled -}}
{{- end -}}

{{/* Stable DNS suffix of the etcd pods: <headless>.<namespace>.svc.<clusterDomain>. */}}
{{- define "ml-defender.etcd.podDomain" -}}
{{- printf "%s.%s.svc.%s" (include "ml-defender.etcd.headlessName" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/* name=peerURL for every member, from the stable pod names; etcd needs it to bootstrap. */}}
{{- define "ml-defender.etcd.initialCluster" -}}
{{- $full := include "ml-defender.etcd.fullname" . -}}
{{- $domain := include "ml-defender.etcd.podDomain" . -}}
{{- $scheme := include "ml-defender.etcd.peerScheme" . -}}
{{- $members := list -}}
{{- range $i := until (int .Values.etcd.replicaCount) -}}
{{- $members = append $members (printf "%s-%d=%s://%s-%d.%s:%d" $full $i $scheme $full $i $domain (int $.Values.etcd.ports.peer)) -}}
{{- end -}}
{{- join "," $members -}}
{{- end -}}

{{/*
Client endpoints the operator and agents dial: every member by its stable name, so the client
library can fail over itself instead of relying on the Service's connection balancing.
*/}}
{{- define "ml-defender.etcd.endpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $full := include "ml-defender.etcd.fullname" . -}}
{{- $domain := include "ml-defender.etcd.podDomain" . -}}
{{- $scheme := include "ml-defender.etcd.clientScheme" . -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicaCount) -}}
{{- $eps = append $eps (printf "%s://%s-%d.%s:%d" $scheme $full $i $domain (int $.Values.etcd.ports.client)) -}}
{{- end -}}
{{- toJson $eps -}}
{{- else -}}
{{- toJson .Values.externalEtcd.endpoints -}}
{{- end -}}
{{- end -}}

{{/*
Members the PodDisruptionBudget keeps up: etcd.pdb.minAvailable when set, else the quorum of
etcd.replicaCount, so changing the member count alone keeps drains safe (5 members: 3).
*/}}
{{- define "ml-defender.etcd.pdbMinAvailable" -}}
{{- $set := .Values.etcd.pdb.minAvailable -}}
{{- if kindIs "invalid" $set -}}
{{- add (div (int .Values.etcd.replicaCount) 2) 1 -}}
{{- else -}}
{{- int $set -}}
{{- end -}}
{{- end -}}

{{/* The Secret of a listener: the user's, or the generated/cert-manager one. */}}
{{- define "ml-defender.etcd.clientServerSecret" -}}
{{- default (printf "%s-client-tls" (include "ml-defender.etcd.fullname" .)) .Values.etcd.tls.client.secretName -}}
{{- end -}}

{{- define "ml-defender.etcd.peerServerSecret" -}}
{{- default (printf "%s-peer-tls" (include "ml-defender.etcd.fullname" .)) .Values.etcd.tls.peer.secretName -}}
{{- end -}}

{{/* True when the clients' CA comes from a Secret this chart owns (generated or cert-manager). */}}
{{- define "ml-defender.etcd.tlsManaged" -}}
{{- if and .Values.etcd.enabled .Values.etcd.tls.client.enabled (not .Values.etcd.tls.client.secretName) }}true{{ end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- library settings */}}

{{/*
The defender_config LibrarySettings document of the operator (JSON; read with load_settings).
Secrets are never in here: the operator reads the keyring through the API, certificates are
mounted. Agents get the same values as DEFENDER_AGENT_* variables (_agent.tpl).
*/}}
{{- define "ml-defender.librarySettings" -}}
{{- $etcd := dict "endpoints" (include "ml-defender.etcd.endpoints" . | fromJsonArray) "timeout_seconds" .Values.config.etcd.timeoutSeconds "retries" .Values.config.etcd.retries "backoff_base_seconds" .Values.config.etcd.backoffBaseSeconds "backoff_max_seconds" .Values.config.etcd.backoffMaxSeconds -}}
{{- if include "ml-defender.etcd.clientTlsEnabled" . -}}
{{- $_ := set $etcd "ca_file" "/etc/ml-defender/etcd-tls/ca.crt" -}}
{{- /* A generated or cert-manager certificate is the members' own: clients get only its CA. */ -}}
{{- if not (include "ml-defender.etcd.tlsManaged" .) -}}
{{- $_ := set $etcd "cert_file" "/etc/ml-defender/etcd-tls/tls.crt" -}}
{{- $_ := set $etcd "key_file" "/etc/ml-defender/etcd-tls/tls.key" -}}
{{- end -}}
{{- end -}}
{{- $envelope := dict "compress" .Values.config.envelope.compress "encrypt" .Values.config.envelope.encrypt "cipher" .Values.config.envelope.cipher "level" .Values.config.envelope.level "threshold_bytes" .Values.config.envelope.thresholdBytes "max_decompressed_bytes" .Values.config.envelope.maxDecompressedBytes -}}
{{- $settings := dict "etcd" $etcd "envelope" $envelope "prefix" .Values.config.prefix -}}
{{- with .Values.config.plaintextComponents }}
{{- $_ := set $settings "plaintext_components" . -}}
{{- end -}}
{{- toPrettyJson $settings -}}
{{- end -}}

{{/* True (non-empty) when the clients must talk TLS to etcd. */}}
{{- define "ml-defender.etcd.clientTlsEnabled" -}}
{{- if .Values.etcd.enabled -}}
{{- if .Values.etcd.tls.client.enabled }}true{{ end -}}
{{- else -}}
{{- if .Values.externalEtcd.tls.secretName }}true{{ end -}}
{{- end -}}
{{- end -}}

{{- define "ml-defender.etcd.clientTlsSecret" -}}
{{- if .Values.etcd.enabled -}}
{{- default (include "ml-defender.etcd.clientServerSecret" .) .Values.etcd.tls.client.clientSecretName -}}
{{- else -}}
{{- .Values.externalEtcd.tls.secretName -}}
{{- end -}}
{{- end -}}

{{/* The agent sidecar helpers are in _agent.tpl (ml-defender.agent.sidecar and friends); the
etcd lock-down helpers (generated certificates and passwords) in _security.tpl. */}}

{{/*
CRDs copied from the repository's crds/ into files/crds/ (by `make manifests`), rendered with the
release's labels and, when keep is true, `helm.sh/resource-policy: keep`. A file may hold several
documents. Call with (dict "ctx" $ "file" "files/crds/x.yaml" "keep" true).
*/}}
{{- define "ml-defender.crdsFromFile" -}}
{{- $ctx := .ctx -}}
{{- $keep := .keep -}}
{{- $content := $ctx.Files.Get .file -}}
{{- if not $content -}}
{{- fail (printf "%s is missing from the chart: run `make manifests` to copy crds/ into it" .file) -}}
{{- end -}}
{{- range $doc := splitList "\n---\n" $content }}
{{- $crd := fromYaml $doc }}
{{- if $crd.kind }}
{{- $meta := $crd.metadata }}
{{- $_ := set $meta "labels" (merge (include "ml-defender.labels" $ctx | fromYaml) (default (dict) $meta.labels)) }}
{{- if $keep }}
{{- $_ := set $meta "annotations" (merge (dict "helm.sh/resource-policy" "keep") (default (dict) $meta.annotations)) }}
{{- end }}
---
{{ toYaml $crd }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Arguments of `python -m defender_config.etcd_member` in the etcd pods: every member's client URL
(the tool leaves out its own), and how to reach them (TLS with the members' own certificate,
which carries client usage; etcd's root user when authentication is on: member changes need it).
*/}}
{{- define "ml-defender.etcd.memberArgs" -}}
- {{ printf "--endpoints=%s" (include "ml-defender.etcd.endpoints" . | fromJsonArray | join ",") | quote }}
- --config-out=/etc/etcd/run/etcd.yaml
{{- if .Values.etcd.tls.client.enabled }}
- --ca-file=/etc/etcd/tls/client/ca.crt
- --cert-file=/etc/etcd/tls/client/tls.crt
- --key-file=/etc/etcd/tls/client/tls.key
{{- end }}
{{- if include "ml-defender.etcd.authEnabled" . }}
- --user=root
- --password-file=/etc/etcd/auth/root
{{- end }}
{{- end -}}

{{/* What the member tool reads: where it writes etcd's config, the client TLS, the root password. */}}
{{- define "ml-defender.etcd.memberMounts" -}}
- name: run
  mountPath: /etc/etcd/run
{{- if .Values.etcd.tls.client.enabled }}
- name: tls-client
  mountPath: /etc/etcd/tls/client
  readOnly: true
{{- end }}
{{- if include "ml-defender.etcd.authEnabled" . }}
- name: member-auth
  mountPath: /etc/etcd/auth
  readOnly: true
{{- end }}
{{- end -}}

{{/*
The admission webhooks: one name for both webhook configurations, the operator's Secret, and the
cert-manager Certificate.
*/}}
{{- define "ml-defender.admission.name" -}}
{{- printf "%s-admission" (include "ml-defender.operator.fullname" .) -}}
{{- end -}}

{{/* DNS names the API server uses to reach the operator's Service. */}}
{{- define "ml-defender.admission.dnsNames" -}}
{{- $svc := include "ml-defender.operator.fullname" . -}}
{{- list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) | toJson -}}
{{- end -}}
